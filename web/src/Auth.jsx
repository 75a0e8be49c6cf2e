// Sign in, or create an account; the field a refusal names is marked on the form.
import { useState } from 'preact/hooks';
import { api, setSession } from './api.js';

export function Auth() {
  const [mode, setMode] = useState('signin');
  const [error, setError] = useState(null);
  const [busy, setBusy] = useState(false);
  const registering = mode === 'register';

  const submit = async (event) => {
    event.preventDefault();
    const form = new FormData(event.currentTarget);
    const body = { email: form.get('email'), password: form.get('password') };
    if (registering && form.get('display_name')) body.display_name = form.get('display_name');
    setBusy(true);
    setError(null);
    try {
      const answer = await api('POST', registering ? '/v1/auth/register' : '/v1/auth/login', body);
      setSession({ access_token: answer.access_token, refresh_token: answer.refresh_token, user: answer.user });
    } catch (failure) {
      setError(failure);
    } finally {
      setBusy(false);
    }
  };
  const invalid = (field) => (error?.field === field ? 'true' : undefined);

  return (
    <main class="auth">
      <h1>Parley</h1>
      <form onSubmit={submit} aria-labelledby="auth-title" noValidate>
        <h2 id="auth-title">{registering ? 'Create an account' : 'Sign in'}</h2>
        {registering && (
          <label>
            Name (optional)
            <input name="display_name" autocomplete="name" />
          </label>
        )}
        <label>
          Email
          <input name="email" type="email" autocomplete="email" required aria-invalid={invalid('email')} />
        </label>
        <label>
          Password
          <input
            name="password"
            type="password"
            required
            minLength={registering ? 10 : undefined}
            autocomplete={registering ? 'new-password' : 'current-password'}
            aria-invalid={invalid('password')}
            aria-describedby={registering ? 'password-hint' : undefined}
          />
        </label>
        {registering && <p id="password-hint" class="hint">At least 10 characters.</p>}
        {error && (
          <p class="error" role="alert">
            {error.message}
          </p>
        )}
        <button type="submit" disabled={busy}>
          {registering ? 'Create account' : 'Sign in'}
        </button>
        <p>
          {registering ? 'Have an account? ' : 'New here? '}
          <button
            type="button"
            class="link"
            onClick={() => {
              setMode(registering ? 'signin' : 'register');
              setError(null);
            }}
          >
            {registering ? 'Sign in' : 'Create an account'}
          </button>
        </p>
      </form>
    </main>
  );
}
