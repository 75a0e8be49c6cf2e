// The conversation list, newest first, and search over every message and title (results replace the
// list while the search box holds a query).
import { useEffect, useState } from 'preact/hooks';
import { api } from './api.js';

function Snippet({ parts }) {
  return parts.map((part, i) => (part.highlight ? <mark key={i}>{part.text}</mark> : <span key={i}>{part.text}</span>));
}

export function Sidebar({ id, activeId, version }) {
  const [conversations, setConversations] = useState([]);
  const [query, setQuery] = useState('');
  const [hits, setHits] = useState(null);
  const [error, setError] = useState(null);

  useEffect(() => {
    api('GET', '/v1/conversations?limit=50')
      .then((page) => setConversations(page.data))
      .catch(setError);
  }, [version, activeId]);

  const search = async (event) => {
    event.preventDefault();
    const q = query.trim();
    if (!q) {
      setHits(null);
      return;
    }
    try {
      setError(null);
      const page = await api('GET', `/v1/search?q=${encodeURIComponent(q)}&limit=20`);
      setHits(page.data);
    } catch (failure) {
      setError(failure);
    }
  };

  return (
    <aside id={id} class="sidebar" aria-label="Conversations">
      <a class="button new-chat" href="#/">
        New conversation
      </a>
      <form role="search" onSubmit={search}>
        <label for="search">Search messages</label>
        <div class="row">
          <input
            id="search"
            type="search"
            value={query}
            onInput={(event) => {
              setQuery(event.currentTarget.value);
              if (!event.currentTarget.value) setHits(null);
            }}
          />
          <button type="submit">Search</button>
        </div>
      </form>
      {error && (
        <p class="error" role="alert">
          {error.message}
        </p>
      )}
      {hits ? (
        <section aria-label="Search results">
          <p class="hint" aria-live="polite">
            {hits.length ? `${hits.length} result${hits.length === 1 ? '' : 's'}` : 'Nothing found'}
          </p>
          <ul class="list">
            {hits.map((hit) => (
              <li key={`${hit.conversation_id}-${hit.message_id}`}>
                <a href={`#/c/${hit.conversation_id}`} class="search-hit">
                  <strong>{hit.title || 'Untitled'}</strong>
                  <span class="snippet">
                    <Snippet parts={hit.snippet} />
                  </span>
                </a>
              </li>
            ))}
          </ul>
        </section>
      ) : (
        <ul class="list">
          {conversations.map((conversation) => (
            <li key={conversation.id}>
              <a href={`#/c/${conversation.id}`} aria-current={conversation.id === activeId ? 'page' : undefined}>
                {conversation.title || 'Untitled'}
              </a>
            </li>
          ))}
        </ul>
      )}
    </aside>
  );
}
