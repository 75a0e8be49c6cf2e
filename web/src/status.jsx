// The public status page: each component's state and the share of recent requests that failed, from
// GET /v1/status, refreshed every 30 seconds.
import { render } from 'preact';
import { useEffect, useState } from 'preact/hooks';
import './style.css';

const words = { operational: 'Operational', degraded: 'Degraded', outage: 'Outage' };

function Status() {
  const [status, setStatus] = useState(null);
  const [error, setError] = useState(null);
  useEffect(() => {
    const load = () =>
      fetch('/v1/status')
        .then((response) => (response.ok ? response.json() : Promise.reject(new Error(`HTTP ${response.status}`))))
        .then((answer) => {
          setStatus(answer);
          setError(null);
        })
        .catch(() => setError('The status service cannot be reached: Parley may be down.'));
    load();
    const timer = setInterval(load, 30_000);
    return () => clearInterval(timer);
  }, []);

  return (
    <main class="status-page">
      <h1>Parley status</h1>
      {error && (
        <p class="banner outage" role="alert">
          {error}
        </p>
      )}
      {status && (
        <>
          <p class={`banner ${status.status}`} role="status">
            {status.status === 'operational'
              ? 'All systems operational'
              : status.status === 'degraded'
                ? 'Some parts are degraded'
                : 'Parley is having an outage'}
          </p>
          <ul class="components" aria-label="Components">
            {status.components.map((component) => (
              <li key={component.id} data-component={component.id}>
                <span>{component.name}</span>
                <span class={`state ${component.status}`}>{words[component.status] ?? component.status}</span>
              </li>
            ))}
          </ul>
          <p class="error-rate">
            Errors in the last {Math.round(status.error_rate.window_seconds / 60)} minutes:{' '}
            <strong>{(status.error_rate.ratio * 100).toFixed(2)}%</strong> of {status.error_rate.requests.toLocaleString()}{' '}
            requests
          </p>
          <p class="hint">Checked {new Date(status.checked_at).toLocaleString()}. <a href="/">Open Parley</a></p>
        </>
      )}
    </main>
  );
}

render(<Status />, document.getElementById('app'));
