//! `parley.chat.v1.ChatService`.

use std::sync::Arc;

use parley_platform::nats::Names;
use parley_platform::replicas::{ReadFloor, WriteMarks};
use parley_platform::sampling::Sampling;
use parley_platform::{Config, ErrorCode, ServiceError, telemetry, timestamps};
use parley_proto::chat::v1 as pb;

use tonic::{Request, Response, Status};
use tracing::Instrument;
use uuid::Uuid;

use crate::ChatError;
use crate::relay::JobQueue;
use crate::storage::{
    CompletedReply, CompletionFilter, ConversationChanges, ConversationRow, Follows, Generation, HistoryMessage,
    MessageRow, NewExchange, NewStoredCompletion, QueuedJob, Storage, StoredCompletionRow, UpdateOutcome, Version,
};
use parley_platform::cursor::{CursorCodec, CursorKind, Position, page_size};
use parley_platform::limits::{MAX_IDEMPOTENCY_KEY_CHARS, MAX_SYSTEM_PROMPT_CHARS, MAX_TITLE_CHARS};
use parley_platform::message_status::MessageStatus;

#[derive(Clone)]
pub struct ChatService {
    config: Arc<Config>,
    storage: Storage,
    cursors: CursorCodec,
    names: Names,
    jobs: JobQueue,
}

impl ChatService {
    pub fn new(
        config: Arc<Config>,
        marks: WriteMarks,
        keyring: parley_platform::envelope::Keyring,
        names: Names,
        jobs: JobQueue,
    ) -> Self {
        let cursors = CursorCodec::new(&config.chat.cursor_secret);
        Self { config, storage: Storage::new(marks, keyring), cursors, names, jobs }
    }

    fn check_model(&self, model: Option<&str>) -> Result<(), ChatError> {
        match model {
            Some(model) if !self.config.models.contains_key(model) => {
                Err(ServiceError::invalid_field("model", format!("unknown model {model:?}")).into())
            }
            Some(model) if !self.config.serves_chat(model) => {
                Err(ServiceError::invalid_field("model", format!("{model:?} makes embeddings, not replies")).into())
            }
            _ => Ok(()),
        }
    }

    /// Where a send goes: its conversation, and after which message (the active branch's last, the
    /// edited question's parent, or the regenerated reply's question). An edit is of one of the user's
    /// questions, a regeneration of one of their finished replies; other ids are not found, and a reply
    /// still being written cannot be regenerated (409).
    async fn placement(&self, user_id: Uuid, request: &pb::SendMessageRequest) -> Result<(Uuid, Follows), ChatError> {
        let (id, role) = match (&request.edit_of, &request.regenerate_of) {
            (None, None) => {
                let id = parse_id_or_not_found(&request.conversation_id)
                    .ok_or_else(|| ServiceError::not_found("conversation"))?;
                return Ok((id, Follows::ActiveBranch));
            }
            (Some(id), None) => (id, "user"),
            (_, Some(id)) => (id, "assistant"),
        };
        let message = match parse_id_or_not_found(id) {
            Some(id) => self.storage.message_for_user(ReadFloor::Primary, user_id, id).await?,
            None => None,
        };
        let message = message.ok_or_else(|| ServiceError::not_found("message"))?;
        if message.role != role {
            let detail = if role == "user" {
                "only questions can be edited; a reply is regenerated instead"
            } else {
                "only replies can be regenerated; a question is edited instead"
            };
            return Err(ServiceError::invalid_field("id", detail).into());
        }
        if role == "user" {
            return Ok((message.conversation_id, Follows::Parent(message.parent_id)));
        }
        if !message.status.is_finished() {
            return Err(
                ServiceError::new(ErrorCode::Conflict, "the reply is still being written; stop it or wait").into()
            );
        }
        let question = message.parent_id.ok_or_else(|| ServiceError::not_found("message"))?;
        Ok((message.conversation_id, Follows::Question(question)))
    }

    /// Hands a committed job to the relay with its context, so that the job's first run need not ask
    /// for it: at once when the send's statement read it, else once it is read, off the send's path
    /// (without it when that read fails).
    fn publish_with_context(&self, mut job: QueuedJob) {
        if job.job.context.is_some() {
            self.jobs.publish(job);
            return;
        }
        let (storage, jobs) = (self.storage.clone(), self.jobs.clone());
        let history_limit = i64::from(self.config.chat.history_limit);
        let publish = async move {
            match storage.carried_context(job.job.message_id, history_limit).await {
                Ok(context) => job.job.context = context,
                Err(error) => tracing::warn!(%error, "could not read the job's context; the agent will ask for it"),
            }
            jobs.publish(job);
        };
        tokio::spawn(publish.in_current_span());
    }

    async fn owned_conversation(
        &self,
        floor: ReadFloor,
        user_id: Uuid,
        conversation_id: &str,
    ) -> Result<ConversationRow, ChatError> {
        let Some(id) = parse_id_or_not_found(conversation_id) else {
            return Err(ServiceError::not_found("conversation").into());
        };
        self.storage
            .conversation(floor, user_id, id)
            .await?
            .ok_or_else(|| ServiceError::not_found("conversation").into())
    }
}

fn parse_user(user_id: &str) -> Result<Uuid, ChatError> {
    Uuid::parse_str(user_id).map_err(|_| ServiceError::invalid_field("user_id", "must be a UUID").into())
}

/// Ids in paths come from clients: one that is not even a UUID names nothing, so it is not found.
fn parse_id_or_not_found(id: &str) -> Option<Uuid> {
    Uuid::parse_str(id).ok()
}

/// How the reply of a send is to be generated, checked.
fn generation(request: &pb::SendMessageRequest) -> Result<Generation, ChatError> {
    let reservation_id = match request.reservation_id.as_deref() {
        Some(id) => Some(
            Uuid::parse_str(id)
                .map_err(|_| ChatError::from(ServiceError::invalid_field("reservation_id", "must be a UUID")))?,
        ),
        None => None,
    };
    let max_tokens = (request.max_tokens > 0).then_some(request.max_tokens);
    let Some(options) = request.options.as_ref() else {
        return Ok(Generation { reservation_id, max_tokens, ..Generation::default() });
    };
    Ok(Generation {
        sampling: Sampling::from_options(options)?,
        cache: parley_platform::events::CacheDirective {
            read: !options.skip_cache_read,
            write: !options.skip_cache_write,
        },
        reservation_id,
        max_tokens,
    })
}

/// Checks a client's text: at most `max_chars` characters, and no NUL (which PostgreSQL's text type
/// cannot hold: without this check it is a database error, not the client's 400).
fn bounded_text(field: &str, value: Option<&str>, max_chars: usize) -> Result<(), ChatError> {
    match value {
        Some(text) if text.chars().count() > max_chars => {
            Err(ServiceError::invalid_field(field, format!("must be at most {max_chars} characters")).into())
        }
        Some(text) if text.contains('\0') => {
            Err(ServiceError::invalid_field(field, "must not contain the NUL character (U+0000)").into())
        }
        _ => Ok(()),
    }
}

fn conversation_to_proto(row: ConversationRow) -> pb::Conversation {
    pb::Conversation {
        id: row.id.to_string(),
        user_id: row.user_id.to_string(),
        title: row.title,
        model: row.model,
        system_prompt: row.system_prompt,
        created_at: Some(timestamps::to_proto(row.created_at)),
        updated_at: Some(timestamps::to_proto(row.updated_at)),
        version: row.version,
    }
}

fn stored_completion_to_proto(row: StoredCompletionRow) -> pb::StoredCompletion {
    pb::StoredCompletion {
        id: row.id.to_string(),
        user_id: row.user_id.to_string(),
        model: row.model,
        metadata: row.metadata.0.to_string(),
        completion: row.completion,
        messages: row.messages,
        created_at: Some(timestamps::to_proto(row.created_at)),
    }
}

/// A metadata object as JSON text (`""`: none), checked as the gateway checks it
/// ([`parley_platform::limits::metadata`]).
fn metadata(text: &str) -> Result<serde_json::Value, ChatError> {
    let value = match text {
        "" => serde_json::Value::Null,
        text => serde_json::from_str(text)
            .map_err(|_| ServiceError::invalid_field("metadata", "must be a JSON object of strings"))?,
    };
    let map = parley_platform::limits::metadata(&value).map_err(|why| ServiceError::invalid_field("metadata", why))?;
    Ok(serde_json::Value::Object(map))
}

/// The JSON text `field` must be: an object (a completion) or an array (messages).
fn json_of_kind(field: &'static str, text: &str, object: bool) -> Result<(), ChatError> {
    match serde_json::from_str::<serde_json::Value>(text) {
        Ok(serde_json::Value::Object(_)) if object => Ok(()),
        Ok(serde_json::Value::Array(_)) if !object => Ok(()),
        _ => Err(ServiceError::invalid_field(
            field,
            if object { "must be a JSON object" } else { "must be a JSON array" },
        )
        .into()),
    }
}

impl ChatService {
    /// Numbers `rows` among their versions. What was stored or read stands without the numbers: a
    /// failure here leaves them out (the fields are optional) rather than failing the call.
    async fn number_versions(&self, floor: parley_platform::replicas::ReadFloor, rows: &mut [MessageRow]) {
        if let Err(error) = self.storage.number_versions(floor, rows).await {
            tracing::warn!(%error, "could not number messages among their versions");
        }
    }
}

/// A completed message of a job's history, with what a prompt takes of it.
fn history_to_proto(conversation_id: Uuid, entry: HistoryMessage) -> pb::Message {
    pb::Message {
        id: entry.id.to_string(),
        conversation_id: conversation_id.to_string(),
        role: entry.role,
        content: entry.content,
        status: MessageStatus::Completed.as_str().to_owned(),
        state: pb::MessageState::from(MessageStatus::Completed).into(),
        created_at: Some(timestamps::to_proto(entry.created_at)),
        ..Default::default()
    }
}

fn message_to_proto(row: MessageRow) -> pb::Message {
    let usage = match (row.input_tokens, row.output_tokens) {
        (Some(input_tokens), Some(output_tokens)) => Some(pb::Usage { input_tokens, output_tokens }),
        _ => None,
    };
    pb::Message {
        id: row.id.to_string(),
        conversation_id: row.conversation_id.to_string(),
        role: row.role,
        content: row.content,
        status: row.status.as_str().to_owned(),
        state: pb::MessageState::from(row.status).into(),
        model: row.model,
        usage,
        created_at: Some(timestamps::to_proto(row.created_at)),
        completed_at: row.completed_at.map(timestamps::to_proto),
        error_code: row.error_code,
        error_detail: row.error_detail,
        parent_id: row.parent_id.map(|id| id.to_string()),
        branch: row.version.map(|version| version.branch),
        branches: row.version.map(|version| version.branches),
    }
}

#[tonic::async_trait]
impl pb::chat_service_server::ChatService for ChatService {
    async fn create_conversation(
        &self,
        request: Request<pb::CreateConversationRequest>,
    ) -> Result<Response<pb::Conversation>, Status> {
        let request = request.into_inner();
        let user_id = parse_user(&request.user_id)?;
        bounded_text("title", request.title.as_deref(), MAX_TITLE_CHARS)?;
        bounded_text("system_prompt", request.system_prompt.as_deref(), MAX_SYSTEM_PROMPT_CHARS)?;
        self.check_model(request.model.as_deref())?;
        let model = request.model.as_deref().unwrap_or(&self.config.default_model);
        let row = self
            .storage
            .create_conversation(user_id, request.title.as_deref(), model, request.system_prompt.as_deref())
            .await
            .map_err(ChatError::from)?;
        tracing::info!(conversation_id = %row.id, "conversation created");
        Ok(Response::new(conversation_to_proto(row)))
    }

    async fn list_conversations(
        &self,
        request: Request<pb::ListConversationsRequest>,
    ) -> Result<Response<pb::ListConversationsResponse>, Status> {
        let request = request.into_inner();
        let user_id = parse_user(&request.user_id)?;
        let after = self.cursors.read(CursorKind::Conversations, request.cursor.as_deref())?;
        let limit = page_size(request.limit);
        let floor = self.storage.floor(user_id).await;
        let mut rows = self
            .storage
            .list_conversations(floor, user_id, after, i64::from(limit) + 1)
            .await
            .map_err(ChatError::from)?;
        let next_cursor = self.cursors.next_page(CursorKind::Conversations, &mut rows, limit, |last| Position {
            at: last.updated_at,
            id: last.id,
        });
        let conversations = rows.into_iter().map(conversation_to_proto).collect();
        Ok(Response::new(pb::ListConversationsResponse { conversations, next_cursor }))
    }

    async fn get_conversation(
        &self,
        request: Request<pb::GetConversationRequest>,
    ) -> Result<Response<pb::Conversation>, Status> {
        let request = request.into_inner();
        let user_id = parse_user(&request.user_id)?;
        let floor = self.storage.floor(user_id).await;
        let row = self.owned_conversation(floor, user_id, &request.conversation_id).await?;
        Ok(Response::new(conversation_to_proto(row)))
    }

    async fn update_conversation(
        &self,
        request: Request<pb::UpdateConversationRequest>,
    ) -> Result<Response<pb::Conversation>, Status> {
        let request = request.into_inner();
        let user_id = parse_user(&request.user_id)?;
        let Some(id) = parse_id_or_not_found(&request.conversation_id) else {
            return Err(ChatError::from(ServiceError::not_found("conversation")).into());
        };
        bounded_text("title", request.title.as_deref(), MAX_TITLE_CHARS)?;
        bounded_text("system_prompt", request.system_prompt.as_deref(), MAX_SYSTEM_PROMPT_CHARS)?;
        self.check_model(request.model.as_deref())?;
        let changes = ConversationChanges {
            title: request.title.as_deref(),
            model: request.model.as_deref(),
            system_prompt: request.system_prompt.as_deref(),
        };
        match self
            .storage
            .update_conversation(user_id, id, request.expected_version, changes)
            .await
            .map_err(ChatError::from)?
        {
            UpdateOutcome::Updated(row) => Ok(Response::new(conversation_to_proto(row))),
            UpdateOutcome::NotFound => Err(ChatError::from(ServiceError::not_found("conversation")).into()),
            UpdateOutcome::VersionMismatch => Err(ChatError::from(ServiceError::new(
                ErrorCode::PreconditionFailed,
                "the conversation was changed since that version; fetch it again",
            ))
            .into()),
        }
    }

    async fn delete_conversation(
        &self,
        request: Request<pb::DeleteConversationRequest>,
    ) -> Result<Response<pb::DeleteConversationResponse>, Status> {
        let request = request.into_inner();
        let user_id = parse_user(&request.user_id)?;
        let deleted = match parse_id_or_not_found(&request.conversation_id) {
            Some(id) => self.storage.delete_conversation(user_id, id).await.map_err(ChatError::from)?,
            None => false,
        };
        if !deleted {
            return Err(ChatError::from(ServiceError::not_found("conversation")).into());
        }
        Ok(Response::new(pb::DeleteConversationResponse {}))
    }

    async fn erase_user(
        &self,
        request: Request<pb::EraseUserRequest>,
    ) -> Result<Response<pb::EraseUserResponse>, Status> {
        let user_id = parse_user(&request.into_inner().user_id)?;
        let conversations = self.storage.erase_user(user_id).await.map_err(ChatError::from)?;
        tracing::info!(%user_id, conversations, "user's conversations erased");
        Ok(Response::new(pb::EraseUserResponse { conversations }))
    }

    async fn store_completion(
        &self,
        request: Request<pb::StoredCompletion>,
    ) -> Result<Response<pb::StoreCompletionResponse>, Status> {
        let request = request.into_inner();
        let user_id = parse_user(&request.user_id)?;
        let id = Uuid::parse_str(&request.id)
            .map_err(|_| ChatError::from(ServiceError::invalid_field("id", "must be a UUID")))?;
        let metadata = metadata(&request.metadata)?;
        json_of_kind("completion", &request.completion, true)?;
        json_of_kind("messages", &request.messages, false)?;
        let new = NewStoredCompletion {
            id,
            user_id,
            model: &request.model,
            metadata: &metadata,
            completion: &request.completion,
            messages: &request.messages,
        };
        self.storage.store_completion(new).await.map_err(ChatError::from)?;
        Ok(Response::new(pb::StoreCompletionResponse {}))
    }

    async fn get_stored_completion(
        &self,
        request: Request<pb::StoredCompletionRequest>,
    ) -> Result<Response<pb::StoredCompletion>, Status> {
        let request = request.into_inner();
        let user_id = parse_user(&request.user_id)?;
        let row = match parse_id_or_not_found(&request.id) {
            Some(id) => {
                let floor = self.storage.floor(user_id).await;
                self.storage.stored_completion(floor, user_id, id).await.map_err(ChatError::from)?
            }
            None => None,
        };
        let row = row.ok_or_else(|| ChatError::from(ServiceError::not_found("completion")))?;
        Ok(Response::new(stored_completion_to_proto(row)))
    }

    async fn list_stored_completions(
        &self,
        request: Request<pb::ListStoredCompletionsRequest>,
    ) -> Result<Response<pb::ListStoredCompletionsResponse>, Status> {
        let request = request.into_inner();
        let user_id = parse_user(&request.user_id)?;
        let metadata = metadata(&request.metadata)?;
        if !(1..=100).contains(&request.limit) {
            return Err(ChatError::from(ServiceError::invalid_field("limit", "must be between 1 and 100")).into());
        }
        // An `after` that names no completion of this user still orders: ids are compared, not looked up.
        let after = match request.after.as_deref() {
            Some(after) => Some(
                Uuid::parse_str(after)
                    .map_err(|_| ChatError::from(ServiceError::invalid_field("after", "must be a completion id")))?,
            ),
            None => None,
        };
        let limit = i64::from(request.limit);
        let filter = CompletionFilter {
            after,
            limit,
            descending: request.descending,
            model: request.model.as_deref(),
            metadata: &metadata,
        };
        let floor = self.storage.floor(user_id).await;
        let mut rows = self.storage.list_stored_completions(floor, user_id, filter).await.map_err(ChatError::from)?;
        let has_more = rows.len() > usize::try_from(limit).unwrap_or(usize::MAX);
        rows.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
        let data = rows.into_iter().map(stored_completion_to_proto).collect();
        Ok(Response::new(pb::ListStoredCompletionsResponse { data, has_more }))
    }

    async fn update_stored_completion(
        &self,
        request: Request<pb::UpdateStoredCompletionRequest>,
    ) -> Result<Response<pb::StoredCompletion>, Status> {
        let request = request.into_inner();
        let user_id = parse_user(&request.user_id)?;
        let metadata = metadata(&request.metadata)?;
        let row = match parse_id_or_not_found(&request.id) {
            Some(id) => self.storage.update_stored_completion(user_id, id, &metadata).await.map_err(ChatError::from)?,
            None => None,
        };
        let row = row.ok_or_else(|| ChatError::from(ServiceError::not_found("completion")))?;
        Ok(Response::new(stored_completion_to_proto(row)))
    }

    async fn delete_stored_completion(
        &self,
        request: Request<pb::StoredCompletionRequest>,
    ) -> Result<Response<pb::DeleteStoredCompletionResponse>, Status> {
        let request = request.into_inner();
        let user_id = parse_user(&request.user_id)?;
        let deleted = match parse_id_or_not_found(&request.id) {
            Some(id) => self.storage.delete_stored_completion(user_id, id).await.map_err(ChatError::from)?,
            None => false,
        };
        if !deleted {
            return Err(ChatError::from(ServiceError::not_found("completion")).into());
        }
        Ok(Response::new(pb::DeleteStoredCompletionResponse {}))
    }

    async fn send_message(
        &self,
        request: Request<pb::SendMessageRequest>,
    ) -> Result<Response<pb::SendMessageResponse>, Status> {
        let request = request.into_inner();
        let user_id = parse_user(&request.user_id)?;
        let (conversation_id, follows) = self.placement(user_id, &request).await?;
        // A regenerated reply has no new question, so no content.
        if !matches!(follows, Follows::Question(_)) && request.content.trim().is_empty() {
            return Err(ChatError::from(ServiceError::invalid_field("content", "must not be empty")).into());
        }
        bounded_text("content", Some(&request.content), self.config.chat.max_message_chars)?;
        self.check_model(request.model.as_deref())?;
        if let Some(key) = &request.idempotency_key
            && (key.is_empty() || key.chars().count() > MAX_IDEMPOTENCY_KEY_CHARS)
        {
            return Err(ChatError::from(ServiceError::invalid_field(
                "Idempotency-Key",
                format!("must be 1 to {MAX_IDEMPOTENCY_KEY_CHARS} characters"),
            ))
            .into());
        }
        let jobs_subject = self.names.jobs_subject();
        let exchange = NewExchange {
            user_id,
            conversation_id,
            content: &request.content,
            model: request.model.as_deref(),
            idempotency_key: request.idempotency_key.as_deref(),
            tier: &request.tier,
            jobs_subject: &jobs_subject,
            traceparent: telemetry::current_traceparent(),
            generation: generation(&request)?,
            follows,
            history_limit: i64::from(self.config.chat.history_limit),
        };
        let Some(mut sent) = self.storage.send(exchange).await.map_err(ChatError::from)? else {
            return Err(ChatError::from(ServiceError::not_found("conversation")).into());
        };
        if let Some(job) = sent.job.take() {
            self.publish_with_context(job);
            metrics::counter!(crate::metrics::MESSAGES_SENT).increment(1);
        }
        if follows == Follows::ActiveBranch && !sent.replayed {
            // A new question goes after the active branch's leaf, which has no children: both messages
            // are the only versions there are.
            sent.user_message.version = Some(Version::ONLY);
            sent.assistant_message.version = Some(Version::ONLY);
        } else {
            let floor = self.storage.floor(user_id).await;
            let mut rows = [sent.user_message, sent.assistant_message];
            self.number_versions(floor, &mut rows).await;
            [sent.user_message, sent.assistant_message] = rows;
        }
        tracing::info!(
            %conversation_id,
            message_id = %sent.assistant_message.id,
            replayed = sent.replayed,
            "message stored"
        );
        Ok(Response::new(pb::SendMessageResponse {
            user_message: Some(message_to_proto(sent.user_message)),
            assistant_message: Some(message_to_proto(sent.assistant_message)),
            replayed: sent.replayed,
        }))
    }

    async fn get_message(&self, request: Request<pb::GetMessageRequest>) -> Result<Response<pb::Message>, Status> {
        let request = request.into_inner();
        let user_id = parse_user(&request.user_id)?;
        let row = match parse_id_or_not_found(&request.message_id) {
            Some(id) => {
                let floor = self.storage.floor(user_id).await;
                self.storage.message_for_user(floor, user_id, id).await.map_err(ChatError::from)?
            }
            None => None,
        };
        let mut row = row.ok_or_else(|| ChatError::from(ServiceError::not_found("message")))?;
        let floor = self.storage.floor(user_id).await;
        self.number_versions(floor, std::slice::from_mut(&mut row)).await;
        Ok(Response::new(message_to_proto(row)))
    }

    async fn list_messages(
        &self,
        request: Request<pb::ListMessagesRequest>,
    ) -> Result<Response<pb::ListMessagesResponse>, Status> {
        let request = request.into_inner();
        let user_id = parse_user(&request.user_id)?;
        let floor = self.storage.floor(user_id).await;
        let conversation = self.owned_conversation(floor, user_id, &request.conversation_id).await?;
        let after = self.cursors.read(CursorKind::Messages, request.cursor.as_deref())?;
        let limit = page_size(request.limit);
        let branch = (conversation.branched && !request.all_branches).then_some(conversation.active_leaf_id).flatten();
        let mut rows = self
            .storage
            .list_messages(floor, conversation.id, branch, after, i64::from(limit) + 1)
            .await
            .map_err(ChatError::from)?;
        if conversation.branched {
            self.number_versions(floor, &mut rows).await;
        } else {
            rows.iter_mut().for_each(|row| row.version = Some(Version::ONLY));
        }
        let next_cursor = self
            .cursors
            .next_page(CursorKind::Messages, &mut rows, limit, |last| Position { at: last.created_at, id: last.id });
        let messages = rows.into_iter().map(message_to_proto).collect();
        Ok(Response::new(pb::ListMessagesResponse { messages, next_cursor }))
    }

    async fn search(&self, request: Request<pb::SearchRequest>) -> Result<Response<pb::SearchResponse>, Status> {
        let request = request.into_inner();
        let user_id = parse_user(&request.user_id)?;
        let floor = self.storage.floor(user_id).await;
        let after = self
            .cursors
            .read_ranked(CursorKind::Search, request.cursor.as_deref())?
            .map(|(rank, id)| crate::storage::SearchPosition { rank, id });
        let limit = page_size(request.limit);
        let hits = self
            .storage
            .search(floor, user_id, &request.query, after, i64::from(limit) + 1)
            .await
            .map_err(ChatError::from)?;
        let Some(mut hits) = hits else {
            let error = ServiceError::invalid_field("q", "has no words to search for (letters or digits)");
            return Err(ChatError::from(error).into());
        };
        let mut next_cursor = None;
        if hits.len() > limit as usize {
            hits.truncate(limit as usize);
            next_cursor = hits
                .last()
                .map(|hit| self.cursors.encode_ranked(CursorKind::Search, hit.position.rank, hit.position.id));
        }
        let hits = hits
            .into_iter()
            .map(|hit| {
                let message_id = hit.role.is_some().then(|| hit.position.id.to_string());
                pb::SearchHit {
                    conversation_id: hit.conversation_id.to_string(),
                    conversation_title: hit.title,
                    message_id,
                    role: hit.role,
                    created_at: Some(timestamps::to_proto(hit.created_at)),
                    rank: hit.position.rank,
                    snippet: hit
                        .snippet
                        .into_iter()
                        .map(|part| pb::SnippetPart { text: part.text, highlight: part.highlight })
                        .collect(),
                }
            })
            .collect();
        Ok(Response::new(pb::SearchResponse { hits, next_cursor }))
    }

    async fn list_siblings(
        &self,
        request: Request<pb::GetMessageRequest>,
    ) -> Result<Response<pb::ListSiblingsResponse>, Status> {
        let request = request.into_inner();
        let user_id = parse_user(&request.user_id)?;
        let found = match parse_id_or_not_found(&request.message_id) {
            Some(id) => {
                let floor = self.storage.floor(user_id).await;
                self.storage.siblings(floor, user_id, id).await.map_err(ChatError::from)?
            }
            None => None,
        };
        let (rows, active) = found.ok_or_else(|| ChatError::from(ServiceError::not_found("message")))?;
        Ok(Response::new(pb::ListSiblingsResponse {
            messages: rows.into_iter().map(message_to_proto).collect(),
            active_id: active.map(|id| id.to_string()),
        }))
    }

    async fn switch_branch(
        &self,
        request: Request<pb::SwitchBranchRequest>,
    ) -> Result<Response<pb::Conversation>, Status> {
        let request = request.into_inner();
        let user_id = parse_user(&request.user_id)?;
        let switched = match parse_id_or_not_found(&request.message_id) {
            Some(id) => self.storage.switch_branch(user_id, id).await.map_err(ChatError::from)?,
            None => None,
        };
        let conversation = switched.ok_or_else(|| ChatError::from(ServiceError::not_found("message")))?;
        Ok(Response::new(conversation_to_proto(conversation)))
    }

    async fn get_job_context(
        &self,
        request: Request<pb::GetJobContextRequest>,
    ) -> Result<Response<pb::JobContext>, Status> {
        let request = request.into_inner();
        let id = Uuid::parse_str(&request.message_id)
            .map_err(|_| ChatError::from(ServiceError::invalid_field("message_id", "must be a UUID")))?;
        let limit = match request.history_limit {
            0 => self.config.chat.history_limit,
            limit => limit,
        };
        let context = self.storage.job_context(id, i64::from(limit)).await.map_err(ChatError::from)?;
        let crate::storage::JobContext { message, conversation, history } =
            context.ok_or_else(|| ChatError::from(ServiceError::not_found("message")))?;
        let summary = conversation.summary;
        let message_conversation = message.conversation_id;
        let model = message.model.clone().unwrap_or_else(|| conversation.model.clone());
        Ok(Response::new(pb::JobContext {
            user_id: message.user_id.to_string(),
            assistant_message: Some(message_to_proto(message)),
            model,
            system_prompt: conversation.system_prompt,
            history: history.into_iter().map(|entry| history_to_proto(message_conversation, entry)).collect(),
            summary: summary.map(|(text, _)| text),
            conversation_id: message_conversation.to_string(),
            untitled: conversation.untitled,
        }))
    }

    async fn set_generated_title(
        &self,
        request: Request<pb::SetGeneratedTitleRequest>,
    ) -> Result<Response<pb::SetGeneratedTitleResponse>, Status> {
        let request = request.into_inner();
        let user_id = parse_user(&request.user_id)?;
        let conversation_id = Uuid::parse_str(&request.conversation_id)
            .map_err(|_| ChatError::from(ServiceError::invalid_field("conversation_id", "must be a UUID")))?;
        let title = request.title.trim();
        if title.is_empty() || title.chars().count() > parley_platform::limits::MAX_TITLE_CHARS {
            let error = ServiceError::invalid_field("title", "must be 1 to 200 characters");
            return Err(ChatError::from(error).into());
        }
        let changed =
            self.storage.set_generated_title(user_id, conversation_id, title).await.map_err(ChatError::from)?;
        Ok(Response::new(pb::SetGeneratedTitleResponse { changed }))
    }

    async fn update_summary(
        &self,
        request: Request<pb::UpdateSummaryRequest>,
    ) -> Result<Response<pb::UpdateSummaryResponse>, Status> {
        let request = request.into_inner();
        let parse = |field: &str, id: &str| {
            Uuid::parse_str(id).map_err(|_| ChatError::from(ServiceError::invalid_field(field, "must be a UUID")))
        };
        let conversation_id = parse("conversation_id", &request.conversation_id)?;
        let until = parse("until_message_id", &request.until_message_id)?;
        let changed =
            self.storage.update_summary(conversation_id, &request.summary, until).await.map_err(ChatError::from)?;
        if changed {
            metrics::counter!(crate::metrics::SUMMARIES_UPDATED).increment(1);
        }
        Ok(Response::new(pb::UpdateSummaryResponse { changed }))
    }

    async fn complete_message(
        &self,
        request: Request<pb::CompleteMessageRequest>,
    ) -> Result<Response<pb::CompleteMessageResponse>, Status> {
        let request = request.into_inner();
        let id = Uuid::parse_str(&request.message_id)
            .map_err(|_| ChatError::from(ServiceError::invalid_field("message_id", "must be a UUID")))?;
        let usage = request.usage.unwrap_or_default();
        let reply = CompletedReply {
            id,
            conversation: Uuid::parse_str(&request.conversation_id).ok(),
            owner: Uuid::parse_str(&request.user_id).ok(),
            content: &request.content,
            model: &request.model,
            input_tokens: usage.input_tokens,
            output_tokens: usage.output_tokens,
        };
        let outcome = self.storage.complete_message(reply).await.map_err(ChatError::from)?;
        let (row, changed) = outcome.ok_or_else(|| ChatError::from(ServiceError::not_found("message")))?;
        if changed {
            metrics::counter!(crate::metrics::MESSAGES_COMPLETED).increment(1);
        } else {
            tracing::info!(message_id = %id, "completion ignored: message already finished");
        }
        Ok(Response::new(pb::CompleteMessageResponse { message: Some(message_to_proto(row)), changed }))
    }

    async fn fail_message(
        &self,
        request: Request<pb::FailMessageRequest>,
    ) -> Result<Response<pb::CompleteMessageResponse>, Status> {
        let request = request.into_inner();
        let id = Uuid::parse_str(&request.message_id)
            .map_err(|_| ChatError::from(ServiceError::invalid_field("message_id", "must be a UUID")))?;
        let conversation = Uuid::parse_str(&request.conversation_id).ok();
        let outcome = self
            .storage
            .fail_message(id, conversation, &request.code, &request.detail, request.partial_content.as_deref())
            .await
            .map_err(ChatError::from)?;
        let (row, changed) = outcome.ok_or_else(|| ChatError::from(ServiceError::not_found("message")))?;
        if changed {
            metrics::counter!(crate::metrics::MESSAGES_FAILED).increment(1);
        }
        Ok(Response::new(pb::CompleteMessageResponse { message: Some(message_to_proto(row)), changed }))
    }
}
