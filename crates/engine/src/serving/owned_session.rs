//! Sessions that own their engine: `'static`, `Send` and `Sync`, for code that must move a
//! session into a thread, an async task or a struct without a lifetime. A [`Session`] borrows
//! its engine and runs each step on the caller's thread; an [`OwnedSession`] holds the engine in
//! an `Arc` and runs its requests on a decode thread of its own: it is the serving core with one
//! slot, so its requests follow the same rules as the server's and as a [`Session`]'s
//! (`Speculation::Draft` included, with the engine's draft model).
//!
//! [`Session`]: crate::Session

use std::sync::Arc;
use std::sync::mpsc::Receiver;

use super::{Event, ServeRequest, ServingConfig, ServingCore, ServingStatus, collect};
use crate::config::{GenerateRequest, SessionConfig};
use crate::engine::{Engine, SessionState};
use crate::error::EngineError;
use crate::outcome::{Completion, SlotAction, SlotActionDone};

// The constructors live with the type: the serving core builds on the engine, not the other way.
impl Engine {
    /// A session that owns (a reference count of) the engine, with its default context
    /// parameters: it can be moved into a thread or an async task (see [`OwnedSession`]).
    ///
    /// # Errors
    /// As [`Engine::session_with`].
    pub fn owned_session(self: &Arc<Self>) -> Result<OwnedSession, EngineError> {
        self.owned_session_with(self.session_config())
    }

    /// An [`OwnedSession`] with `config`'s context parameters.
    ///
    /// # Errors
    /// As [`Engine::session_with`].
    pub fn owned_session_with(self: &Arc<Self>, config: &SessionConfig) -> Result<OwnedSession, EngineError> {
        OwnedSession::start(self, config)
    }
}

/// A session that owns its engine (an `Arc`) and can be moved anywhere: requests run one at a
/// time, in the order they were given, on the session's decode thread, over one context that
/// remembers what it decoded (a request sharing a prefix with the previous one decodes only the
/// new suffix, as in a [`crate::Session`]).
///
/// ```no_run
/// use std::sync::Arc;
/// use exsa_engine::{Engine, EngineConfig, GenerateRequest, serving::Event};
///
/// # fn main() -> Result<(), exsa_engine::EngineError> {
/// let engine = Arc::new(Engine::load(EngineConfig::new("model.gguf"))?);
/// let session = engine.owned_session()?;
/// let worker = std::thread::spawn(move || -> Result<String, exsa_engine::EngineError> {
///     let (text, _completion) = session.generate_text(&GenerateRequest::new("Once upon a time").max_tokens(32))?;
///     Ok(text)
/// });
/// println!("{}", worker.join().expect("the worker panicked")?);
/// # Ok(()) }
/// ```
///
/// Dropping the session lets the requests it accepted run to their end (their receivers or
/// streams still get every event), then stops its thread: the drop waits for them, so in an
/// async task drop it where blocking is allowed (`spawn_blocking`), or cancel the requests
/// first. The state file calls wait too, for the requests given before them.
#[derive(Debug)]
pub struct OwnedSession {
    core: ServingCore,
}

impl OwnedSession {
    /// Requests that may wait behind the running one; more are refused at once
    /// ([`EngineError::NotAccepted`]).
    pub const MAX_WAITING: usize = 64;

    fn start(engine: &Arc<Engine>, config: &SessionConfig) -> Result<OwnedSession, EngineError> {
        let serving = ServingConfig { session: config.clone(), max_queue: Self::MAX_WAITING, ..ServingConfig::new(engine, 1) };
        Ok(OwnedSession { core: ServingCore::start(Arc::clone(engine), serving)? })
    }

    /// Queues `request`; its events arrive on the returned receiver, which can be iterated on
    /// any thread (see [`Event`] for their order). A dropped receiver is seen when the next
    /// event cannot be delivered, which ends the request; to stop one at once, during its
    /// prompt's decode too, give it a [`crate::CancelToken`] (or use [`Self::stream`], whose
    /// drop cancels).
    ///
    /// # Errors
    /// A request the engine refuses (the same checks as [`crate::Session::generate`]: an empty
    /// or too long prompt, bad options, a grammar that does not parse), or
    /// [`EngineError::NotAccepted`] when [`Self::MAX_WAITING`] requests wait already.
    pub fn generate(&self, request: &GenerateRequest) -> Result<Receiver<Event>, EngineError> {
        Ok(self.core.submit(self.prepare(request)?)?)
    }

    /// Runs `request` to its end: all its text and how it ended.
    ///
    /// # Errors
    /// As [`Self::generate`], and the request's own failure (a decode error, a cancel before it
    /// started).
    pub fn generate_text(&self, request: &GenerateRequest) -> Result<(String, Completion), EngineError> {
        collect(self.generate(request)?)
    }

    /// Queues `request`; its events come as an async stream, which cancels the request when
    /// dropped before its end (an async task that is aborted or loses a `select!` stops its
    /// generation).
    ///
    /// # Errors
    /// As [`Self::generate`].
    #[cfg(feature = "tokio")]
    pub fn stream(&self, request: &GenerateRequest) -> Result<crate::serving::EventStream, EngineError> {
        Ok(self.core.stream(self.prepare(request)?)?)
    }

    /// Writes what the cache holds to `path` once the requests given before have ended (as
    /// [`crate::Session::save_state_file`]).
    ///
    /// # Errors
    /// [`EngineError::SlotFile`] naming the path when it cannot be written;
    /// [`EngineError::NotAccepted`] as [`Self::generate`].
    pub fn save_state_file(&self, path: impl Into<std::path::PathBuf>) -> Result<SlotActionDone, EngineError> {
        self.slot_action(SlotAction::Save(path.into()))
    }

    /// Replaces the cache with the state file at `path` once the requests given before have
    /// ended (as [`crate::Session::restore_state_file`]).
    ///
    /// # Errors
    /// [`EngineError::SlotFile`] naming the path for a file that cannot be read or is no state of
    /// this model and context; [`EngineError::NotAccepted`] as [`Self::generate`].
    pub fn restore_state_file(&self, path: impl Into<std::path::PathBuf>) -> Result<SlotActionDone, EngineError> {
        self.slot_action(SlotAction::Restore(path.into()))
    }

    /// What the cache holds, as bytes in memory, once the requests given before have ended (as
    /// [`crate::Session::save_state`]).
    ///
    /// # Errors
    /// As [`crate::Session::save_state`]; [`EngineError::NotAccepted`] as [`Self::generate`].
    pub fn save_state(&self) -> Result<SessionState, EngineError> {
        answer(self.core.save_state(0)?)
    }

    /// Replaces the cache with `state` once the requests given before have ended (as
    /// [`crate::Session::restore_state`]).
    ///
    /// # Errors
    /// As [`crate::Session::restore_state`]; [`EngineError::NotAccepted`] as [`Self::generate`].
    pub fn restore_state(&self, state: &SessionState) -> Result<(), EngineError> {
        answer(self.core.restore_state(0, state.clone())?)
    }

    fn slot_action(&self, action: SlotAction) -> Result<SlotActionDone, EngineError> {
        answer(self.core.slot_action(0, action)?)
    }

    /// The engine the session runs on.
    pub fn engine(&self) -> &Arc<Engine> {
        self.core.engine()
    }

    /// The session's counters (tokens decoded, reused from the cache, generated).
    pub fn status(&self) -> ServingStatus {
        self.core.status()
    }

    fn prepare(&self, request: &GenerateRequest) -> Result<ServeRequest, EngineError> {
        ServeRequest::new(self.engine(), request)
    }
}

/// A slot job's outcome: the decode thread answers once the slot is idle, and ends only after
/// answering.
fn answer<T>(reply: Receiver<Result<T, EngineError>>) -> Result<T, EngineError> {
    reply.recv().map_err(|_| EngineError::Cancelled)?
}
