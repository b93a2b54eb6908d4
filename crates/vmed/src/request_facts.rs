//! What the access-control layer learned about one API request, for the audit log.
//!
//! The policy middleware (who is asking, may they) inserts a [`RequestFacts`] into the
//! response's extensions; the audit layer, outside it, reads it back together with the
//! status and appends one record. Keeping this type apart lets either side change without
//! the other: a response with no facts (a route the policy did not see) is audited with the
//! actor `unknown`, so nothing goes unrecorded.

/// The decision on one request, as the audit log records it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RequestFacts {
    /// The authenticated user's name; `anonymous` when no identity was shown.
    pub actor: String,
    /// The project the request acted in, when it names or implies one.
    pub project: Option<String>,
    /// The permission the route declares, e.g. `vm.start` or `image.import`.
    pub action: String,
    /// The object acted on, e.g. `vm/acme/web`; empty for collection-wide actions.
    pub object: String,
    /// The object's security label, when it has one.
    pub label: Option<String>,
    /// Whether the policy allowed the request (the handler may still have failed).
    pub allowed: bool,
    /// Why it was denied (empty when allowed).
    pub reason: String,
    /// Where the request came from: `unix:uid=N` or `tcp:ADDR:PORT`.
    pub source: String,
}
