//! Custom events on PostgreSQL (`Notifier::notify_with`), and their overflow policy.
//!
//! A custom event takes its channel's own path — a NOTIFY carrying the payload, or a journal
//! row (plus an empty wake-up NOTIFY on the durable tier) — so listeners treat it exactly like
//! a trigger's event. Only the notify tier limits sizes: a payload over NOTIFY's limit (less
//! the signature, on a signed channel) is stored in the overflow table and the notification
//! carries a reference to it, like a trigger's oversized row; or, when the caller does not
//! allow that, it fails with [`Error::PayloadTooLarge`] and nothing is sent.

use std::sync::Arc;

use futures_util::future::BoxFuture;
use serde_json::Value;
use tokio_postgres::types::Type;

use super::control::Control;
use super::ddl::SCHEMA;
use super::signing;
use crate::error::{Error, Result};
use crate::event::Channel;
use crate::payload::{encode_overflow_ref, NOTIFY_PAYLOAD_LIMIT};
use crate::sql::quote_ident;
use crate::tier::Tier;

/// Sends `payload` (`value` rendered) on `channel`, through the overflow table when it is too
/// large for a notification and `allow_overflow`.
pub(super) fn send(
    control: &Arc<Control>,
    channel: &Channel,
    payload: String,
    value: &Value,
    allow_overflow: bool,
) -> BoxFuture<'static, Result<()>> {
    let limit = match payload_limit(channel) {
        Some(limit) if payload.len() > limit => limit,
        _ => return notify(control.clone(), channel, payload),
    };
    let too_large = Error::PayloadTooLarge {
        channel: channel.name().to_string(),
        size: payload.len(),
        limit,
    };
    if !allow_overflow {
        return Box::pin(async move { Err(too_large) });
    }
    let (control, channel, value) = (control.clone(), channel.clone(), value.clone());
    Box::pin(async move {
        let reference = store_overflow(&control, channel.name(), &payload).await?;
        let stub = encode_overflow_ref(&reference, &value, &channel);
        if stub.len() > limit {
            return Err(too_large);
        }
        notify(control, &channel, stub).await
    })
}

/// Largest payload a notification on `channel` can carry: none for the journal tiers (a
/// journal row has no size limit).
fn payload_limit(channel: &Channel) -> Option<usize> {
    if channel.tier != Tier::Notify {
        return None;
    }
    let signature = if channel.signed {
        signing::SIGNATURE_LEN
    } else {
        0
    };
    Some(NOTIFY_PAYLOAD_LIMIT - signature)
}

/// Sends `payload` on `channel` the way its trigger would.
fn notify(
    control: Arc<Control>,
    channel: &Channel,
    payload: String,
) -> BoxFuture<'static, Result<()>> {
    let sql = match channel.tier {
        // Signed like a trigger's payload, by the server: the key never leaves it.
        Tier::Notify if channel.signed => format!(
            "SELECT pg_catalog.pg_notify($1, coalesce({}, '') || $2)",
            signing::signature_sql("$1", "$2")
        ),
        Tier::Notify => "SELECT pg_catalog.pg_notify($1, $2)".to_string(),
        Tier::Durable => format!(
            "WITH j AS (INSERT INTO {}.journal (channel, payload) VALUES ($1, $2) RETURNING 1) \
             SELECT pg_catalog.pg_notify($1, '') FROM j",
            quote_ident(SCHEMA)
        ),
        Tier::Poll => format!(
            "INSERT INTO {}.journal (channel, payload) VALUES ($1, $2)",
            quote_ident(SCHEMA)
        ),
        // A transactional logical-decoding message, which the slot's reader takes as an event
        // on the channel its prefix names. Any role may emit one: signed like a notify-tier
        // payload, but over the message's prefix rather than the channel: a notify-tier
        // payload someone saw is no valid message (the reader refuses what does not verify).
        // No key row, no message: an error below, rather than send what would be refused.
        Tier::Logical => format!(
            "SELECT pg_catalog.pg_logical_emit_message(true, 'sqlnotify:' || $1, {} || $2)::text \
               FROM {}.signing AS _sqn_k WHERE _sqn_k.id = 1",
            signing::hmac_sql("_sqn_k.ipad", "_sqn_k.opad", "('sqlnotify:' || $1)", "$2"),
            quote_ident(SCHEMA)
        ),
    };
    let logical = channel.tier == Tier::Logical;
    let channel = channel.name.clone();
    Box::pin(async move {
        let client = control.client().await?;
        let rows = client
            .query_typed(&sql, &[(&channel, Type::TEXT), (&payload, Type::TEXT)])
            .await
            .map_err(|e| Error::db(format!("sending a notification on {channel}"), e))?;
        if logical && rows.is_empty() {
            return Err(Error::InvalidPayload {
                channel: "sqlnotify.signing".into(),
                reason: format!(
                    "the signing key is missing, so a custom event on {channel} (logical tier) \
                     cannot be signed: start a notifier with manage_triggers(true) once, or \
                     apply install_sql() of a trigger-tier watch, which creates it"
                ),
            });
        }
        Ok(())
    })
}

/// Stores an oversized payload for `channel`; returns its reference (a random token).
async fn store_overflow(control: &Control, channel: &str, payload: &str) -> Result<String> {
    let client = control.client().await?;
    let sql = format!(
        "INSERT INTO {}.overflow (channel, payload) VALUES ($1, $2) RETURNING token::text",
        quote_ident(SCHEMA)
    );
    let row = client
        .query_typed_one(&sql, &[(&channel, Type::TEXT), (&payload, Type::TEXT)])
        .await
        .map_err(|e| Error::db(format!("storing an overflow row for {channel}"), e))?;
    Ok(row.get(0))
}
