//! A request's events as an async [`Stream`] (feature `tokio`): the decode thread sends them
//! into a tokio channel without waiting, so no thread is parked per request, and the task that
//! reads them can be moved, raced and dropped like any other future.

use std::pin::Pin;
use std::task::{Context, Poll};

use futures_core::Stream;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};

use super::{Event, EventSink, ServeRequest, ServingCore, SubmitError};
use crate::config::CancelToken;

impl ServingCore {
    /// Queues a request whose events come as an async [`EventStream`], which cancels the
    /// request when dropped before its end, through the request's own [`CancelToken`] where it
    /// has one (else one made for it): requests given the same token stop together, so give one
    /// token per request unless that is what is meant.
    ///
    /// # Errors
    /// As [`ServingCore::submit_to`]: a full queue, a stopping core, a request prepared for
    /// another engine.
    pub fn stream(&self, mut request: ServeRequest) -> Result<EventStream, SubmitError> {
        let cancel = request.prepared.options.cancel.get_or_insert_with(CancelToken::new).clone();
        let (sink, mut events) = EventStream::channel(cancel);
        self.submit_to(request, sink).inspect_err(|_| {
            // Not accepted: nothing to cancel (and a token shared with accepted requests must
            // not stop them).
            events.ended = true;
        })?;
        Ok(events)
    }
}

impl EventSink for UnboundedSender<Event> {
    fn send(&mut self, event: Event) -> bool {
        UnboundedSender::send(self, event).is_ok()
    }
}

/// The events of one submitted request, in [`Event`]'s order: deltas (and progress, where asked
/// for), then exactly one [`Event::Done`] or [`Event::Failed`], after which the stream ends.
///
/// Dropping the stream before that end cancels the request: the decode loop stops it at its
/// next step (during its prompt's decode too) and frees its slot. A stream that has seen its end
/// cancels nothing, so requests sharing a [`CancelToken`] (the choices of one HTTP request) do
/// not stop each other as each finishes.
#[derive(Debug)]
pub struct EventStream {
    events: UnboundedReceiver<Event>,
    cancel: CancelToken,
    ended: bool,
}

impl EventStream {
    /// A channel for a request cancelled through `cancel`: the sink goes to the decode loop.
    fn channel(cancel: CancelToken) -> (UnboundedSender<Event>, EventStream) {
        let (sink, events) = unbounded_channel();
        (sink, EventStream { events, cancel, ended: false })
    }

    /// A stream that has ended: no events, and nothing to cancel (in place of one taken).
    #[cfg(feature = "server")]
    pub(crate) fn finished() -> EventStream {
        let (_, events) = unbounded_channel();
        EventStream { events, cancel: CancelToken::new(), ended: true }
    }

    /// The next event; `None` once the request has ended (or the serving core stopped under
    /// it, which a well-behaved core never does to an accepted request).
    pub async fn recv(&mut self) -> Option<Event> {
        std::future::poll_fn(|cx| self.poll_recv(cx)).await
    }

    /// Polls for the next event (the [`Stream`] implementation, without the pin).
    pub fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<Event>> {
        if self.ended {
            return Poll::Ready(None);
        }
        let event = std::task::ready!(self.events.poll_recv(cx));
        // The end (or a channel closed without one: nothing is left to cancel).
        self.ended = matches!(event, None | Some(Event::Done(_) | Event::Failed(_)));
        Poll::Ready(event)
    }

    /// Waits for the request's end: its whole text and how it ended (the async
    /// [`super::collect`]).
    ///
    /// # Errors
    /// The request's failure ([`Event::Failed`]), or [`crate::EngineError::Cancelled`] when the
    /// stream ends without its end (the core stopped under it).
    pub async fn collect_text(mut self) -> Result<(String, super::Completion), crate::EngineError> {
        let mut text = String::new();
        while let Some(event) = self.recv().await {
            if let Some(end) = super::gather(&mut text, event) {
                return end.map(|c| (text, c));
            }
        }
        Err(crate::EngineError::Cancelled)
    }

    /// Cancels the request now; its stream still ends with [`Event::Done`] (cancelled) or
    /// [`Event::Failed`] as the decode loop reports it.
    pub fn cancel(&self) {
        self.cancel.cancel();
    }
}

impl Stream for EventStream {
    type Item = Event;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Event>> {
        self.get_mut().poll_recv(cx)
    }
}

impl Drop for EventStream {
    fn drop(&mut self) {
        if !self.ended {
            self.cancel.cancel();
        }
    }
}
