// The caller's usage: what is left of the token budgets, and tokens, requests and cost by day.
import { useEffect, useState } from 'preact/hooks';
import { api } from './api.js';

const number = (value) => (value ?? 0).toLocaleString();

function Budget({ name, window }) {
  if (!window) return null;
  const used = Math.min(100, Math.round(((window.used + window.reserved) / Math.max(window.limit, 1)) * 100));
  return (
    <div class="budget">
      <span>
        {name}: {number(window.remaining)} of {number(window.limit)} tokens left
      </span>
      <progress max={100} value={used} aria-label={`${name} budget used`}>
        {used}%
      </progress>
    </div>
  );
}

export function Usage() {
  const [report, setReport] = useState(null);
  const [me, setMe] = useState(null);
  const [error, setError] = useState(null);
  useEffect(() => {
    Promise.all([api('GET', '/v1/usage?group_by=day'), api('GET', '/v1/me')])
      .then(([usage, account]) => {
        setReport(usage);
        setMe(account);
      })
      .catch(setError);
  }, []);
  if (error) return <p class="error" role="alert">{error.message}</p>;
  if (!report) return <p aria-busy="true">Loading usage…</p>;
  return (
    <section class="panel" aria-labelledby="usage-title">
      <h1 id="usage-title">Usage</h1>
      <p>
        {me?.email} · tier <strong>{me?.tier}</strong>
      </p>
      {report.budget && (
        <>
          <Budget name="Today" window={report.budget.day} />
          <Budget name="This month" window={report.budget.month} />
        </>
      )}
      <dl class="totals">
        <div>
          <dt>Requests</dt>
          <dd>{number(report.totals.requests)}</dd>
        </div>
        <div>
          <dt>Tokens</dt>
          <dd>{number(report.totals.total_tokens)}</dd>
        </div>
        <div>
          <dt>Cost</dt>
          <dd>${report.totals.cost_usd.toFixed(4)}</dd>
        </div>
      </dl>
      <div class="table-scroll" tabIndex={0} role="region" aria-label="Usage by day">
        <table>
        <caption>
          By day, {report.from.slice(0, 10)} to {report.to.slice(0, 10)}
        </caption>
        <thead>
          <tr>
            <th scope="col">Day</th>
            <th scope="col">Requests</th>
            <th scope="col">Input tokens</th>
            <th scope="col">Output tokens</th>
            <th scope="col">Cost (USD)</th>
          </tr>
        </thead>
        <tbody>
          {report.data.map((row) => (
            <tr key={row.day}>
              <th scope="row">{row.day}</th>
              <td>{number(row.requests)}</td>
              <td>{number(row.input_tokens)}</td>
              <td>{number(row.output_tokens)}</td>
              <td>{row.cost_usd.toFixed(4)}</td>
            </tr>
          ))}
        </tbody>
        </table>
      </div>
    </section>
  );
}
