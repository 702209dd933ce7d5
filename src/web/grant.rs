//! What the authorization hook decides for one connection: a [`Grant`] (the subscriptions
//! the client gets, filters included) or a refusal ([`Denied`]).

use actix_web::http::StatusCode;

use crate::subscription::Subscription;

/// The events one client may receive: the subscriptions the authorization hook granted it.
/// Query parameters can only add filters to them (see `SseBuilder::param`), never remove any,
/// so what a client gets is at most what its grant selects.
///
/// ```
/// use sqlnotify::web::Grant;
/// use sqlnotify::{Filter, Operation, Subscription};
///
/// let user_id = 42;
/// let grant = Grant::new()
///     .subscription(Subscription::new("orders", Operation::Insert).filter(Filter::eq("owner_id", user_id)))
///     .subscription(Subscription::new("orders", Operation::Update).filter(Filter::eq("owner_id", user_id)));
/// # let _ = grant;
/// ```
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Grant {
    pub(crate) subscriptions: Vec<Subscription>,
}

impl Grant {
    /// A grant of nothing yet (a connection with an empty grant is refused with 403).
    pub fn new() -> Self {
        Grant::default()
    }

    /// Adds a subscription: its table, operation, channel label and filters. Its overflow
    /// policy and buffer are the endpoint's (`SseBuilder::slow_client`, `SseBuilder::buffer`).
    pub fn subscription(mut self, subscription: Subscription) -> Self {
        self.subscriptions.push(subscription);
        self
    }

    /// The granted subscriptions.
    pub fn subscriptions(&self) -> &[Subscription] {
        &self.subscriptions
    }
}

/// Why a connection was refused: its HTTP status and a message for the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denied {
    pub(crate) status: StatusCode,
    pub(crate) message: String,
}

impl Denied {
    /// 401 Unauthorized: the client did not say who it is (no or an expired session).
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Denied {
            status: StatusCode::UNAUTHORIZED,
            message: message.into(),
        }
    }

    /// 403 Forbidden: the client may not have these events.
    pub fn forbidden(message: impl Into<String>) -> Self {
        Denied {
            status: StatusCode::FORBIDDEN,
            message: message.into(),
        }
    }

    /// 400 Bad Request: the request itself is wrong.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Denied {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
        }
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The message sent to the client.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl std::fmt::Display for Denied {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.status, self.message)
    }
}
