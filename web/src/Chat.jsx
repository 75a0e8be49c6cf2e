// One conversation: its active branch, replies streamed as they are written, stop, edit, regenerate,
// versions to switch between, and feedback on replies. A new conversation is created by its first send.
import { useEffect, useRef, useState } from 'preact/hooks';
import { api, allPages, idempotencyKey } from './api.js';
import { readEvents } from './sse.js';
import { renderMarkdown } from './markdown.js';

const finished = (message) => message.status === 'completed' || message.status === 'failed';

/** The ratings a reply can be given, and the word on each button. */
const RATINGS = [
  ['up', 'Good'],
  ['down', 'Bad'],
];

function Versions({ message, onSwitch, disabled }) {
  if (!message.branches || message.branches < 2) return null;
  return (
    <span class="versions" role="group" aria-label="Versions">
      <button aria-label="Previous version" disabled={disabled || message.branch <= 1} onClick={() => onSwitch(message, -1)}>
        ‹
      </button>
      <span>
        {message.branch} / {message.branches}
      </span>
      <button
        aria-label="Next version"
        disabled={disabled || message.branch >= message.branches}
        onClick={() => onSwitch(message, 1)}
      >
        ›
      </button>
    </span>
  );
}

function Message({ message, busy, rating, actions }) {
  const [editing, setEditing] = useState(false);
  const [draft, setDraft] = useState(message.content);
  const mine = message.role === 'user';
  return (
    <article class={`message ${message.role}`} aria-label={mine ? 'You' : 'Reply'} data-status={message.status}>
      <header>
        <span class="who">{mine ? 'You' : message.model || 'Assistant'}</span>
        <Versions message={message} onSwitch={actions.switchVersion} disabled={busy} />
      </header>
      {editing ? (
        <form
          class="edit"
          onSubmit={(event) => {
            event.preventDefault();
            setEditing(false);
            actions.edit(message, draft);
          }}
        >
          <label>
            Edit your message
            <textarea value={draft} onInput={(event) => setDraft(event.currentTarget.value)} rows={3} />
          </label>
          <div class="row">
            <button type="submit" disabled={!draft.trim()}>
              Save and send
            </button>
            <button type="button" class="secondary" onClick={() => setEditing(false)}>
              Cancel
            </button>
          </div>
        </form>
      ) : mine ? (
        <p class="plain">{message.content}</p>
      ) : (
        // A model's reply is untrusted: renderMarkdown sanitises it.
        <div class="markdown" dangerouslySetInnerHTML={{ __html: renderMarkdown(message.content) }} />
      )}
      {message.status === 'failed' && (
        <p class="error">The reply failed{message.error?.detail ? `: ${message.error.detail}` : '.'}</p>
      )}
      {message.id && finished(message) && !editing && (
        <footer class="actions">
          {mine ? (
            <button class="secondary" disabled={busy} onClick={() => setEditing(true)}>
              Edit
            </button>
          ) : (
            <>
              <button class="secondary" disabled={busy} onClick={() => actions.regenerate(message)}>
                Regenerate
              </button>
              {message.status === 'completed' && (
                <>
                  {RATINGS.map(([value, word]) => (
                    <button
                      key={value}
                      class="secondary"
                      aria-label={`${word} reply`}
                      aria-pressed={rating === value}
                      onClick={() => actions.rate(message, value)}
                    >
                      {word}
                    </button>
                  ))}
                </>
              )}
            </>
          )}
        </footer>
      )}
    </article>
  );
}

export function Chat({ conversationId, onListChanged }) {
  const [conversation, setConversation] = useState(null);
  const [messages, setMessages] = useState([]);
  const [streaming, setStreaming] = useState(null); // {messageId} while a reply streams
  const [draft, setDraft] = useState('');
  const [error, setError] = useState(null);
  const [ratings, setRatings] = useState({});
  const aborter = useRef(null);
  const titleTimer = useRef(null);
  const bottom = useRef(null);

  const load = async () => {
    if (!conversationId) return;
    try {
      const [found, thread] = await Promise.all([
        api('GET', `/v1/conversations/${conversationId}`),
        allPages(`/v1/conversations/${conversationId}/messages`),
      ]);
      setConversation(found);
      setMessages(thread);
      if (!found.title && thread.length) awaitTitle(3);
      const last = thread[thread.length - 1];
      if (last?.role === 'assistant' && !finished(last) && !aborter.current) resume(last);
    } catch (failure) {
      setError(failure);
    }
  };
  // A conversation is titled by the model shortly after its first exchange: look again a few times.
  const awaitTitle = (tries) => {
    titleTimer.current = setTimeout(async () => {
      try {
        const found = await api('GET', `/v1/conversations/${conversationId}`);
        setConversation(found);
        if (found.title) onListChanged();
        else if (tries > 1) awaitTitle(tries - 1);
      } catch {
        // The title can wait for the next visit.
      }
    }, 1500);
  };
  useEffect(() => {
    load();
    return () => {
      aborter.current?.abort();
      clearTimeout(titleTimer.current);
    };
  }, [conversationId]);
  useEffect(() => bottom.current?.scrollIntoView?.({ block: 'end' }), [messages]);

  // Replaces the message with `id` (or the pending reply) and keeps the rest.
  const upsert = (message) =>
    setMessages((current) => {
      const at = current.findIndex((m) => m.id === message.id || (m.pending && message.role === 'assistant'));
      if (at < 0) return [...current, message];
      const next = current.slice();
      next[at] = message;
      return next;
    });

  /** Applies one event of a reply's stream to the thread; the finished reply (or null when it failed) at its end. */
  const apply = (event, reply) => {
    const data = JSON.parse(event.data);
    if (event.event === 'message.created') {
      // The question (new, or the one a regeneration answers again), then room for its reply.
      setMessages((current) => {
        const rest = current.filter((m) => m.id !== data.id && !m.pending);
        return [...rest, data, { id: null, role: 'assistant', content: '', status: 'pending', pending: true }];
      });
    } else if (event.event === 'message.delta') {
      reply.id = data.message_id;
      reply.text += data.text;
      setStreaming({ messageId: reply.id });
      upsert({ id: reply.id, role: 'assistant', content: reply.text, status: 'streaming', pending: true });
    } else if (event.event === 'message.reset') {
      reply.text = '';
    } else if (event.event === 'message.completed') {
      upsert(data);
      return { done: data };
    } else if (event.event === 'message.failed') {
      upsert({ id: data.message_id, role: 'assistant', content: reply.text, status: 'failed', error: data });
      return { done: null };
    }
    return null;
  };

  /**
   * Reads a reply's event stream into the thread. If the stream ends early or the connection breaks,
   * it resumes from the last event it saw (`Last-Event-ID`), a few times.
   */
  const follow = async (response, signal, reply = { id: null, text: '' }) => {
    let lastEventId = null;
    for (let attempt = 0; attempt < 4; attempt++) {
      try {
        for await (const event of readEvents(response)) {
          lastEventId = event.id ?? lastEventId;
          const ended = apply(event, reply);
          if (ended) return ended.done;
        }
      } catch (broken) {
        if (signal.aborted || !reply.id) throw broken;
      }
      if (!reply.id || signal.aborted) break;
      const headers = { accept: 'text/event-stream', ...(lastEventId ? { 'last-event-id': lastEventId } : {}) };
      response = await api('GET', `/v1/messages/${reply.id}/events`, undefined, { headers, raw: true, signal });
    }
    return null;
  };

  /** A reply still being written when the thread was loaded (a reload mid-stream): follow it to its end. */
  const resume = async (message) => {
    const controller = new AbortController();
    aborter.current = controller;
    setStreaming({ messageId: message.id });
    try {
      const headers = { accept: 'text/event-stream' };
      const events = `/v1/messages/${message.id}/events`;
      const response = await api('GET', events, undefined, { headers, raw: true, signal: controller.signal });
      await follow(response, controller.signal, { id: message.id, text: '' });
    } catch (failure) {
      if (failure.name !== 'AbortError') setError(failure);
    } finally {
      setStreaming(null);
    }
  };

  /** Posts to `path` asking for an event stream, then follows it; `before` trims the thread first. */
  const stream = async (path, body, before) => {
    setError(null);
    const controller = new AbortController();
    aborter.current = controller;
    setStreaming({ messageId: null });
    try {
      let id = conversationId;
      if (!id) {
        const created = await api('POST', '/v1/conversations', {});
        id = created.id;
        path = `/v1/conversations/${id}/messages`;
      }
      before?.();
      const headers = { accept: 'text/event-stream', 'idempotency-key': idempotencyKey() };
      const response = await api('POST', path, body, { headers, raw: true, signal: controller.signal });
      await follow(response, controller.signal);
      if (!conversationId) {
        // Show the new conversation (which then waits for its title) and list it.
        onListChanged();
        window.location.hash = `#/c/${id}`;
      } else if (before) {
        // An edit or a regeneration made new versions: the thread as stored, with their numbers.
        await load();
      }
      return true;
    } catch (failure) {
      if (failure.name !== 'AbortError') {
        setError(failure);
        setMessages((current) => current.filter((m) => !(m.pending && !m.content)));
        // An edit or a regeneration trimmed the thread first: show it as stored again.
        if (before && conversationId) load();
      }
      return false;
    } finally {
      setStreaming(null);
    }
  };

  const send = (event) => {
    event?.preventDefault();
    const content = draft.trim();
    if (!content || streaming) return;
    setDraft('');
    // A refused send (a limit, a network failure) gives the text back to edit and send again.
    stream(`/v1/conversations/${conversationId}/messages`, { content }).then((sent) => {
      if (!sent) setDraft((current) => current || content);
    });
  };

  const cut = (message, keep) => () =>
    setMessages((current) => current.slice(0, current.findIndex((m) => m.id === message.id) + (keep ? 1 : 0)));

  const actions = {
    edit: (message, content) => stream(`/v1/messages/${message.id}/edit`, { content }, cut(message, false)),
    regenerate: (message) => {
      const question = messages.findIndex((m) => m.id === message.id) - 1;
      stream(`/v1/messages/${message.id}/regenerate`, {}, cut(messages[question] ?? message, true));
    },
    switchVersion: async (message, step) => {
      try {
        const siblings = await api('GET', `/v1/messages/${message.id}/siblings`);
        const target = siblings.data[message.branch - 1 + step];
        if (!target) return;
        await api('PUT', `/v1/conversations/${conversationId}/active-branch`, { message_id: target.id });
        await load();
      } catch (failure) {
        setError(failure);
      }
    },
    rate: async (message, rating) => {
      try {
        if (ratings[message.id] === rating) {
          await api('DELETE', `/v1/messages/${message.id}/feedback`);
          setRatings({ ...ratings, [message.id]: null });
        } else {
          await api('PUT', `/v1/messages/${message.id}/feedback`, { rating });
          setRatings({ ...ratings, [message.id]: rating });
        }
      } catch (failure) {
        setError(failure);
      }
    },
  };

  // Renamed with the version it was read at (If-Match): a change made elsewhere meanwhile is refused.
  const rename = async () => {
    const title = window.prompt('New title', conversation.title ?? '');
    if (title === null || !title.trim()) return;
    try {
      const headers = { 'if-match': `"${conversation.version}"` };
      setConversation(await api('PATCH', `/v1/conversations/${conversationId}`, { title: title.trim() }, { headers }));
      onListChanged();
    } catch (failure) {
      setError(failure);
      if (failure.status === 412) load();
    }
  };

  const remove = async () => {
    if (!window.confirm('Delete this conversation and all its messages?')) return;
    try {
      await api('DELETE', `/v1/conversations/${conversationId}`);
      onListChanged();
      window.location.hash = '#/';
    } catch (failure) {
      setError(failure);
    }
  };

  const stop = async () => {
    if (!streaming?.messageId) return;
    try {
      await api('POST', `/v1/messages/${streaming.messageId}/stop`, {});
    } catch (failure) {
      // A reply that finished meanwhile cannot be stopped: nothing to say.
      if (failure.status !== 409) setError(failure);
    }
  };

  return (
    <section class="chat" aria-label="Conversation">
      <header class="chat-header">
        <h1 class="title">{conversation?.title || (conversationId ? 'Untitled' : 'New conversation')}</h1>
        {conversation && (
          <div class="row">
            <button class="secondary" onClick={rename} disabled={!!streaming}>
              Rename
            </button>
            <button class="secondary" onClick={remove} disabled={!!streaming}>
              Delete
            </button>
          </div>
        )}
      </header>
      <div class="thread" role="log" aria-live="polite" aria-busy={streaming ? 'true' : 'false'}>
        {messages.length === 0 && !conversationId && <p class="hint">Ask anything to start a conversation.</p>}
        {messages.map((message, i) => (
          <Message
            key={message.id ?? `pending-${i}`}
            message={message}
            busy={!!streaming}
            rating={ratings[message.id]}
            actions={actions}
          />
        ))}
        <div ref={bottom} />
      </div>
      {error && (
        <p class="error" role="alert">
          {error.message}
        </p>
      )}
      <form class="composer" onSubmit={send}>
        <label for="composer" class="visually-hidden">
          Message
        </label>
        <textarea
          id="composer"
          rows={2}
          placeholder="Message Parley (Enter to send, Shift+Enter for a new line)"
          value={draft}
          onInput={(event) => setDraft(event.currentTarget.value)}
          onKeyDown={(event) => {
            if (event.key === 'Enter' && !event.shiftKey && !event.isComposing) send(event);
          }}
        />
        {streaming ? (
          <button type="button" onClick={stop} disabled={!streaming.messageId}>
            Stop
          </button>
        ) : (
          <button type="submit" disabled={!draft.trim()}>
            Send
          </button>
        )}
      </form>
    </section>
  );
}
