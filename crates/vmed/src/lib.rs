//! `vmed`, the daemon that manages VMs: it owns the REST API (over a Unix socket), the state
//! store, the lifecycle state machine and the supervision of one `vme-vmm` process per VM.
//! It must never map guest memory or emulate devices: it talks to each monitor only over its
//! control socket, so a daemon bug cannot reach into a guest.
//!
//! The API's routes are listed in [`api`]'s docs (and served as OpenAPI 3 at
//! `/1.0/openapi.json`); long actions are [`operations`], and every VM state change and
//! operation is published on the [`events`] stream (`/1.0/events`).

pub mod accounting;
pub mod admission;
pub mod api;
pub mod audit;
pub mod authn;
pub mod authz;
pub mod authz_api;
pub mod authz_checks;
pub mod authz_layer;
pub mod cgroup;
pub mod console_attach;
pub mod crashpoint;
pub mod daemon;
pub mod devices;
pub mod events;
pub mod guest;
pub mod https;
pub mod images;
pub mod images_api;
pub mod jail;
pub mod labels;
pub mod lifecycle;
pub mod limits;
pub mod metrics;
pub mod names;
pub mod network;
pub mod operations;
pub mod publish;
pub mod reconcile;
pub mod request_facts;
pub mod scrub;
pub mod settings;
pub mod store;
pub mod store_auth;
pub mod store_images;
pub mod tls;
pub mod usage;
pub mod validate;
