//! Process-level operations an operator triggers: drain (stop taking new
//! client sessions) and reload (re-read the config file). The admin HTTP
//! layer and the signal handler call these; the work is done by the server
//! wiring (`server.rs`), which owns the reloadable pieces.
//!
//! `draining` in [`StatusHub`] has exactly one writer: [`Control::drain`].

use std::sync::Arc;

use serde::Serialize;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::status::StatusHub;

/// What a reload did.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct ReloadReport {
    /// Keys whose new value is in effect.
    pub applied: Vec<String>,
    /// Keys that changed in the file but need a restart; the running value
    /// is kept.
    pub needs_restart: Vec<String>,
}

pub type ReloadReply = oneshot::Sender<Result<ReloadReport, String>>;

pub struct Control {
    drain: CancellationToken,
    status: Arc<StatusHub>,
    reload: mpsc::Sender<ReloadReply>,
    /// Role changes go to the role controller (`crate::rolectl`); unset on
    /// a node without replication.
    roles: std::sync::OnceLock<crate::rolectl::Requests>,
}

impl Control {
    /// `drain` is the token the client listener stops on; the receiver gets
    /// reload requests (see `server.rs`).
    pub fn new(
        drain: CancellationToken,
        status: Arc<StatusHub>,
    ) -> (Arc<Control>, mpsc::Receiver<ReloadReply>) {
        let (tx, rx) = mpsc::channel(4);
        (
            Arc::new(Control {
                drain,
                status,
                reload: tx,
                roles: std::sync::OnceLock::new(),
            }),
            rx,
        )
    }

    /// Stops accepting new client sessions; open sessions end at their next
    /// safe point (or at the grace deadline). `/readiness` answers 503 from
    /// the moment this returns. Returns false if already draining.
    pub fn drain(&self) -> bool {
        let mut first = false;
        self.status.update(|s| {
            first = !s.draining;
            s.draining = true;
        });
        self.drain.cancel();
        first
    }

    pub fn draining(&self) -> bool {
        self.drain.is_cancelled()
    }

    /// Asks the server to re-read its config file, and waits for the result.
    pub async fn reload(&self) -> Result<ReloadReport, String> {
        let (tx, rx) = oneshot::channel();
        self.reload
            .send(tx)
            .await
            .map_err(|_| "the server is shutting down".to_string())?;
        rx.await
            .map_err(|_| "the server is shutting down".to_string())?
    }

    /// Connects the role controller (once, at start-up).
    pub fn set_roles(&self, tx: crate::rolectl::Requests) {
        let _ = self.roles.set(tx);
    }

    /// Asks the role controller for a role change and waits for its result.
    pub async fn role_change(
        &self,
        cmd: crate::rolectl::Command,
    ) -> Result<serde_json::Value, String> {
        let tx = self
            .roles
            .get()
            .ok_or_else(|| "this node is not replicated: no role to change".to_string())?;
        let (reply, rx) = oneshot::channel();
        tx.send((cmd, reply))
            .await
            .map_err(|_| "the server is shutting down".to_string())?;
        rx.await
            .map_err(|_| "the server is shutting down".to_string())?
    }
}
