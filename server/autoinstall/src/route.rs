//! The HTTP route of automatic installs on si-server's HTTP service:
//!
//! - `GET /autoinstall/answer/<node>/<token>`: the node's rendered answer file;
//! - `GET|POST /autoinstall/done/<node>/<token>`: the install finished: the node is marked
//!   installed, flips to local boot, and the token is used up.
//!
//! Who may ask: only the node itself — the request must come from the node's static address
//! or a current DHCP lease of one of its MACs — and only with the node's current one-time
//! token (compared in constant time). Answer files can hold password hashes: everything else
//! gets 403 or 404 and no content. A render error is a 500 with no part of the file.

use crate::render::{node_addresses, render_answer, ServerUrls};
use crate::store::Store;
use si_boot::http::{Route, RouteReply};
use si_inventory::{BootAction, Inventory};
use std::net::IpAddr;
use std::sync::Arc;

/// What happens when a node reports its install done (mark installed, regenerate boot files).
pub type DoneHook = Arc<dyn Fn(&str) -> anyhow::Result<()> + Send + Sync>;

/// The `/autoinstall/` route.
pub struct AnswerRoute {
    pub store: Store,
    pub inv: Arc<Inventory>,
    pub urls: ServerUrls,
    pub on_done: DoneHook,
}

impl std::fmt::Debug for AnswerRoute {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AnswerRoute")
            .field("store", &self.store)
            .field("urls", &self.urls)
            .finish()
    }
}

use si_boot::http::StatusCode;
const OK: StatusCode = StatusCode::OK;
const FORBIDDEN: StatusCode = StatusCode::FORBIDDEN;
const NOT_FOUND: StatusCode = StatusCode::NOT_FOUND;
const METHOD: StatusCode = StatusCode::METHOD_NOT_ALLOWED;
const ERROR: StatusCode = StatusCode::INTERNAL_SERVER_ERROR;

impl AnswerRoute {
    /// Checks that `peer` is the node and `token` its token; the reply to send otherwise.
    fn check(&self, peer: IpAddr, node: &str, token: &str) -> Result<(), RouteReply> {
        let deny = |why: &str| {
            tracing::warn!(%peer, node, why, "autoinstall request refused");
            Err(RouteReply::text(FORBIDDEN, "forbidden\n"))
        };
        if crate::check_name("node", node).is_err() {
            return Err(RouteReply::text(NOT_FOUND, "not found\n"));
        }
        let b = match self.inv.boot_info(node) {
            Ok(Some(b)) => b,
            Ok(None) => return Err(RouteReply::text(NOT_FOUND, "not found\n")),
            Err(e) => {
                tracing::error!(node, error = format!("{e:#}"), "reading the inventory");
                return Err(RouteReply::text(ERROR, "internal error\n"));
            }
        };
        if b.action != BootAction::Autoinstall {
            return deny("the node is not set to autoinstall");
        }
        let addrs = match node_addresses(&self.inv, &b) {
            Ok(a) => a,
            Err(e) => {
                tracing::error!(
                    node,
                    error = format!("{e:#}"),
                    "reading the node's addresses"
                );
                return Err(RouteReply::text(ERROR, "internal error\n"));
            }
        };
        let IpAddr::V4(p4) = peer else {
            return deny("IPv6 peer");
        };
        if !addrs.contains(&p4) {
            return deny("the address is not the node's");
        }
        match self.store.token_matches(node, token) {
            Ok(true) => Ok(()),
            Ok(false) => deny("wrong or used token"),
            Err(e) => {
                tracing::error!(node, error = format!("{e:#}"), "reading the token");
                Err(RouteReply::text(ERROR, "internal error\n"))
            }
        }
    }

    fn answer_file(&self, peer: IpAddr, node: &str, token: &str) -> RouteReply {
        if let Err(r) = self.check(peer, node, token) {
            return r;
        }
        match render_answer(&self.store, &self.inv, node, &self.urls) {
            Ok(r) => {
                tracing::info!(%peer, node, profile = %r.profile, distro = %r.distro, bytes = r.text.len(), "served answer file");
                RouteReply::text(OK, r.text)
            }
            Err(e) => {
                tracing::error!(%peer, node, error = format!("{e:#}"), "answer file not served");
                RouteReply::text(
                    ERROR,
                    "the answer file could not be rendered: see si-server's log\n",
                )
            }
        }
    }

    fn done(&self, peer: IpAddr, node: &str, token: &str) -> RouteReply {
        if let Err(r) = self.check(peer, node, token) {
            return r;
        }
        match self.store.consume_token(node, token) {
            Ok(true) => {}
            Ok(false) => return RouteReply::text(FORBIDDEN, "forbidden\n"),
            Err(e) => {
                tracing::error!(node, error = format!("{e:#}"), "consuming the token");
                return RouteReply::text(ERROR, "internal error\n");
            }
        }
        match (self.on_done)(node) {
            Ok(()) => {
                tracing::info!(%peer, node, "automatic install done: node installed, boots locally");
                RouteReply::text(OK, "installed\n")
            }
            Err(e) => {
                tracing::error!(
                    node,
                    error = format!("{e:#}"),
                    "recording the finished install"
                );
                RouteReply::text(ERROR, "internal error\n")
            }
        }
    }
}

impl Route for AnswerRoute {
    fn prefix(&self) -> &str {
        crate::ROUTE_PREFIX
    }

    fn answer(&self, peer: IpAddr, method: &si_boot::http::Method, rest: &str) -> RouteReply {
        let parts: Vec<&str> = rest.split('/').collect();
        match (parts.as_slice(), method.as_str()) {
            (["answer", node, token], "GET" | "HEAD") => self.answer_file(peer, node, token),
            (["done", node, token], "GET" | "POST") => self.done(peer, node, token),
            (["answer" | "done", _, _], _) => RouteReply::text(METHOD, "method not allowed\n"),
            _ => RouteReply::text(NOT_FOUND, "not found\n"),
        }
    }
}
