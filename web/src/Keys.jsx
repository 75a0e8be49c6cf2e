// API keys: create one (its secret shown once), list them, revoke one.
import { useEffect, useState } from 'preact/hooks';
import { api } from './api.js';

export function Keys() {
  const [keys, setKeys] = useState([]);
  const [created, setCreated] = useState(null);
  const [error, setError] = useState(null);
  const load = () =>
    api('GET', '/v1/api-keys')
      .then((page) => setKeys(page.data))
      .catch(setError);
  useEffect(() => {
    load();
  }, []);

  const create = async (event) => {
    event.preventDefault();
    const form = event.currentTarget;
    const data = new FormData(form);
    try {
      setError(null);
      const key = await api('POST', '/v1/api-keys', {
        name: data.get('name'),
        require_signature: data.get('require_signature') === 'on',
      });
      setCreated(key);
      form.reset();
      load();
    } catch (failure) {
      setError(failure);
    }
  };
  const revoke = async (key) => {
    if (!window.confirm(`Revoke ${key.name}? Programs using it stop working at once.`)) return;
    try {
      await api('DELETE', `/v1/api-keys/${key.id}`);
      load();
    } catch (failure) {
      setError(failure);
    }
  };

  return (
    <section class="panel" aria-labelledby="keys-title">
      <h1 id="keys-title">API keys</h1>
      <p class="hint">
        Use a key as <code>Authorization: Bearer pk_…</code>, or with the OpenAI SDKs pointed at{' '}
        <code>{window.location.origin}/v1</code>.
      </p>
      <form class="row" onSubmit={create}>
        <label>
          Key name
          <input name="name" required maxLength={100} aria-invalid={error?.field === 'name' ? 'true' : undefined} />
        </label>
        <label class="check">
          <input type="checkbox" name="require_signature" /> Require signed requests
        </label>
        <button type="submit">Create key</button>
      </form>
      {error && (
        <p class="error" role="alert">
          {error.message}
        </p>
      )}
      {created && (
        <div class="secret" role="status">
          <p>
            Copy the key now; it is not shown again.
          </p>
          <label>
            Key
            <input readOnly value={created.key} onFocus={(event) => event.currentTarget.select()} />
          </label>
          {created.signing_secret && (
            <label>
              Signing secret
              <input readOnly value={created.signing_secret} onFocus={(event) => event.currentTarget.select()} />
            </label>
          )}
        </div>
      )}
      <div class="table-scroll" tabIndex={0} role="region" aria-label="Your keys">
        <table>
        <caption>Your keys</caption>
        <thead>
          <tr>
            <th scope="col">Name</th>
            <th scope="col">Starts with</th>
            <th scope="col">Created</th>
            <th scope="col">Last used</th>
            <th scope="col">
              <span class="visually-hidden">Actions</span>
            </th>
          </tr>
        </thead>
        <tbody>
          {keys.map((key) => (
            <tr key={key.id}>
              <th scope="row">{key.name}</th>
              <td>
                <code>{key.prefix}</code>
              </td>
              <td>{key.created_at?.slice(0, 10)}</td>
              <td>{key.last_used_at?.slice(0, 10) ?? 'never'}</td>
              <td>
                <button class="secondary" onClick={() => revoke(key)} aria-label={`Revoke ${key.name}`}>
                  Revoke
                </button>
              </td>
            </tr>
          ))}
        </tbody>
        </table>
      </div>
    </section>
  );
}
