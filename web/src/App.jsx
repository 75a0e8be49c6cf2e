// The web client's frame: signed out, the sign-in form; signed in, the conversations beside the page
// the address names (#/c/<id>, #/usage, #/keys), with a menu button on narrow screens.
import { useEffect, useState } from 'preact/hooks';
import { currentSession, onSessionChange, setSession, api } from './api.js';
import { Auth } from './Auth.jsx';
import { Chat } from './Chat.jsx';
import { Sidebar } from './Sidebar.jsx';
import { Usage } from './Usage.jsx';
import { Keys } from './Keys.jsx';

function useHashRoute() {
  const read = () => window.location.hash.replace(/^#\/?/, '');
  const [route, setRoute] = useState(read);
  useEffect(() => {
    const changed = () => setRoute(read());
    window.addEventListener('hashchange', changed);
    return () => window.removeEventListener('hashchange', changed);
  }, []);
  return route;
}

export function App() {
  const [session, setCurrent] = useState(currentSession);
  const [menuOpen, setMenuOpen] = useState(false);
  // Bumped when a conversation is created, renamed or retitled, so the list reloads.
  const [listVersion, setListVersion] = useState(0);
  const route = useHashRoute();
  useEffect(() => onSessionChange(setCurrent), []);
  useEffect(() => setMenuOpen(false), [route]);

  if (!session) return <Auth />;

  const signOut = async () => {
    try {
      await api('POST', '/v1/auth/logout', { refresh_token: session.refresh_token });
    } catch {
      // Signing out here does not depend on the server agreeing.
    }
    setSession(null);
    window.location.hash = '';
  };
  const [page, id] = route.split('/');
  const conversationId = page === 'c' ? id : null;
  let main;
  if (page === 'usage') main = <Usage />;
  else if (page === 'keys') main = <Keys />;
  else main = <Chat key={conversationId ?? 'new'} conversationId={conversationId} onListChanged={() => setListVersion((v) => v + 1)} />;

  return (
    <div class={`shell ${menuOpen ? 'menu-open' : ''}`}>
      <header class="topbar">
        <button class="menu-button" aria-expanded={menuOpen} aria-controls="sidebar" onClick={() => setMenuOpen(!menuOpen)}>
          Conversations
        </button>
        <a class="brand" href="#/">Parley</a>
        <nav aria-label="Account">
          <a href="#/usage" aria-current={page === 'usage' ? 'page' : undefined}>Usage</a>
          <a href="#/keys" aria-current={page === 'keys' ? 'page' : undefined}>API keys</a>
          <a href="/status">Status</a>
          <button class="link" onClick={signOut}>Sign out</button>
        </nav>
      </header>
      <Sidebar id="sidebar" activeId={conversationId} version={listVersion} />
      <main class="page">{main}</main>
    </div>
  );
}
