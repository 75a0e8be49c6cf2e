// Calls to Parley's REST API from the browser: the session (access and refresh tokens, kept in
// localStorage), one refresh on a 401, and problem+json answers turned into errors that name the field.

const SESSION_KEY = 'parley.session';
const listeners = new Set();
let session = readSession();
let refreshing = null;

function readSession() {
  try {
    return JSON.parse(localStorage.getItem(SESSION_KEY)) ?? null;
  } catch {
    return null;
  }
}

export function currentSession() {
  return session;
}

export function onSessionChange(listener) {
  listeners.add(listener);
  return () => listeners.delete(listener);
}

export function setSession(next) {
  session = next;
  if (next) localStorage.setItem(SESSION_KEY, JSON.stringify(next));
  else localStorage.removeItem(SESSION_KEY);
  listeners.forEach((listener) => listener(next));
}

/** A refused request: the problem's detail, its HTTP status, the field it names, and Retry-After. */
export class ApiError extends Error {
  constructor(status, problem, retryAfter) {
    super(problem?.detail || problem?.title || `The server answered ${status}.`);
    this.status = status;
    this.code = problem?.code;
    this.field = problem?.field;
    this.retryAfter = retryAfter;
  }
}

async function toError(response) {
  let problem = null;
  try {
    problem = await response.json();
  } catch {
    // Not JSON (a proxy's page): the status says enough.
  }
  const retryAfter = Number(response.headers.get('retry-after')) || undefined;
  const error = new ApiError(response.status, problem, retryAfter);
  if (response.status === 429 && retryAfter) error.message = `${error.message} (retry in ${retryAfter} s)`;
  return error;
}

function refreshOnce() {
  refreshing ??= (async () => {
    try {
      const response = await fetch('/v1/auth/refresh', {
        method: 'POST',
        headers: { 'content-type': 'application/json' },
        body: JSON.stringify({ refresh_token: session?.refresh_token }),
      });
      if (!response.ok) throw await toError(response);
      const tokens = await response.json();
      setSession({ ...session, access_token: tokens.access_token, refresh_token: tokens.refresh_token });
      return true;
    } catch {
      setSession(null);
      return false;
    } finally {
      refreshing = null;
    }
  })();
  return refreshing;
}

/**
 * Calls the API; resolves to the parsed JSON (null for 204), or with `raw` to the response itself
 * (an event stream). Throws an ApiError for any answer that is not 2xx.
 */
export async function api(method, path, body, { headers = {}, raw = false, signal } = {}) {
  const send = () =>
    fetch(path, {
      method,
      signal,
      headers: {
        ...(body === undefined ? {} : { 'content-type': 'application/json' }),
        ...(session ? { authorization: `Bearer ${session.access_token}` } : {}),
        ...headers,
      },
      body: body === undefined ? undefined : JSON.stringify(body),
    });
  let response = await send();
  if (response.status === 401 && session?.refresh_token && !path.startsWith('/v1/auth/')) {
    if (await refreshOnce()) response = await send();
  }
  if (!response.ok) throw await toError(response);
  if (raw) return response;
  if (response.status === 204) return null;
  return response.json();
}

/** Every page of a cursor-paginated list. */
export async function allPages(path, limit = 100) {
  const items = [];
  let cursor = null;
  do {
    const separator = path.includes('?') ? '&' : '?';
    const query = `${separator}limit=${limit}${cursor ? `&cursor=${encodeURIComponent(cursor)}` : ''}`;
    const page = await api('GET', path + query);
    items.push(...page.data);
    cursor = page.next_cursor;
  } while (cursor);
  return items;
}

/** A fresh idempotency key (crypto.randomUUID needs a secure context; plain http does not have one). */
export function idempotencyKey() {
  if (crypto.randomUUID) return crypto.randomUUID();
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return Array.from(bytes, (byte) => byte.toString(16).padStart(2, '0')).join('');
}
