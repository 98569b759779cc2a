//! Who a call comes from, for the fair share between clients, their
//! in-flight limits and (once they authenticate) what they may run.
//!
//! Two regimes, set by the config file's `[[client]]` tables:
//! - **Authenticated**: the tables carry credentials (`token_sha256` or
//!   `cert_san`). Every call must present one (see [`crate::auth`]), its
//!   client is the one the credential names, and it may run only the tasks
//!   its `tasks` patterns match.
//! - **Claimed**: no table has credentials (or there is none). A call's
//!   client is its `offload-client` metadata value, else its peer's IP
//!   address. That is the caller's claim, not a proof: it decides whose turn
//!   a call waits for, not what it may run.
//!
//! Declared clients have their weight and limit; any other client has
//! weight 1 and no limit.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

use globset::{Glob, GlobSet, GlobSetBuilder};
use serde::Deserialize;
use tonic::metadata::MetadataMap;

use crate::{
    error::CallError,
    schedule::{Class, Priority},
};

/// Metadata naming the calling client.
pub const CLIENT_HEADER: &str = "offload-client";
/// Metadata asking for a priority (`interactive` or `batch`).
pub const PRIORITY_HEADER: &str = "offload-priority";
/// The metrics label of every client not declared in the config (labels
/// stay bounded whatever callers claim).
pub const OTHER_CLIENTS: &str = "other";

/// A `[[client]]` table of the config file.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientSpec {
    /// The identity: the `offload-client` value its calls carry.
    pub name: String,
    /// Calls served per turn while it has calls waiting. Default 1.
    #[serde(default = "one")]
    pub weight: u32,
    /// Calls it may have admitted and unfinished at once; more are refused
    /// with RESOURCE_EXHAUSTED. Default: no limit.
    pub max_in_flight: Option<usize>,
    /// Jobs it may have queued at once; a Submit over it is refused with
    /// RESOURCE_EXHAUSTED. Default: no limit.
    #[serde(default)]
    pub max_queued_jobs: Option<usize>,
    /// Hex SHA-256 of the bearer token it authenticates with.
    #[serde(default)]
    pub token_sha256: Option<String>,
    /// A DNS or URI subject alternative name of the client certificate it
    /// authenticates with (mutual TLS).
    #[serde(default)]
    pub cert_san: Option<String>,
    /// Glob patterns of the tasks it may run (an authenticated client only).
    #[serde(default)]
    pub tasks: Option<Vec<String>>,
    /// Whether it may use the admin service (an authenticated client only).
    #[serde(default)]
    pub admin: bool,
}

fn one() -> u32 {
    1
}

/// Why a `[[client]]` table is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ClientSpecError {
    /// The name is not a valid identity.
    #[error("client name {0:?}: {1}")]
    Name(String, &'static str),
    /// Weight 0 or too large.
    #[error("client {0:?}: weight {1} is not in 1..=1000")]
    Weight(String, u32),
    /// max_in_flight or max_queued_jobs = 0.
    #[error("client {0:?}: {1} must be at least 1")]
    Limit(String, &'static str),
    /// The same name twice.
    #[error("client {0:?} is declared twice")]
    Twice(String),
    /// A credential or permission setting is wrong.
    #[error("client {0:?}: {1}")]
    Auth(String, String),
}

/// Checks an identity: 1 to 64 characters of `[A-Za-z0-9._:-]` (an IP
/// address or a service name).
fn check_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() || name.len() > 64 {
        return Err("must be 1 to 64 characters");
    }
    if !name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._:-".contains(&b)) {
        return Err("may hold only letters, digits, '.', '_', ':' and '-'");
    }
    if name == OTHER_CLIENTS {
        return Err("is the label of undeclared clients");
    }
    Ok(())
}

/// A client's standing: declared or not, with what is in flight.
#[derive(Debug)]
pub struct Client {
    name: Arc<str>,
    weight: u32,
    max_in_flight: Option<usize>,
    max_queued_jobs: Option<usize>,
    in_flight: AtomicUsize,
    declared: bool,
    /// SHA-256 of its bearer token.
    token: Option<[u8; 32]>,
    /// The certificate name it authenticates with.
    cert_san: Option<String>,
    /// What it may run (authenticated clients).
    tasks: Option<Permissions>,
    /// May use the admin service.
    admin: bool,
}

/// The tasks an authenticated client may run: glob patterns.
#[derive(Debug)]
struct Permissions {
    patterns: Vec<String>,
    set: GlobSet,
}

impl Client {
    /// Its identity.
    pub fn name(&self) -> &Arc<str> {
        &self.name
    }

    /// Its metrics label: its name if declared, else [`OTHER_CLIENTS`].
    pub fn label(&self) -> &str {
        if self.declared { &self.name } else { OTHER_CLIENTS }
    }

    /// How many jobs it may have queued at once, if it is limited.
    pub fn max_queued_jobs(&self) -> Option<usize> {
        self.max_queued_jobs
    }

    /// The scheduling class of its calls of `priority`.
    pub fn class(&self, priority: Priority) -> Class {
        Class { client: Arc::clone(&self.name), weight: self.weight, priority }
    }

    /// Counts one more call in flight, or refuses it over the limit. Only
    /// declared clients are counted (their gauge and limit); for any other
    /// the count would be thrown away with the call.
    pub fn enter(self: &Arc<Self>) -> Result<Option<InFlight>, CallError> {
        if !self.declared {
            return Ok(None);
        }
        let now = self.in_flight.fetch_add(1, Ordering::AcqRel) + 1;
        let guard = InFlight(Arc::clone(self));
        match self.max_in_flight {
            Some(limit) if now > limit => {
                Err(CallError::ClientLimit { client: self.name.to_string(), limit })
                // `guard` drops here and gives the place back.
            }
            _ => Ok(Some(guard)),
        }
    }

    /// Whether it may use the admin service.
    pub fn admin(&self) -> bool {
        self.admin
    }

    /// Whether it may run `task`: any task, unless it authenticated with
    /// a `tasks` list that matches no pattern of it.
    pub fn may_run(&self, task: &str) -> bool {
        self.tasks.as_ref().is_none_or(|p| p.set.is_match(task))
    }

    /// Refuses `task` with PERMISSION_DENIED unless [`Client::may_run`].
    pub fn check_task(&self, task: &str) -> Result<(), CallError> {
        match &self.tasks {
            Some(permissions) if !permissions.set.is_match(task) => Err(CallError::PermissionDenied {
                client: self.name.to_string(),
                task: task.to_string(),
                allowed: permissions.patterns.join(", "),
            }),
            _ => Ok(()),
        }
    }

    /// Calls in flight now.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }
}

/// One call counted in its client's in-flight total while it lives.
#[derive(Debug)]
pub struct InFlight(Arc<Client>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The clients the config declares, and how to recognise a call's.
#[derive(Debug, Default)]
pub struct Clients {
    declared: HashMap<String, Arc<Client>>,
    /// Calls must authenticate (the tables carry credentials).
    authenticating: bool,
    /// Some client authenticates with a certificate name.
    by_certificate: bool,
}

impl Clients {
    /// The clients of the `[[client]]` tables, checked.
    pub fn new(specs: &[ClientSpec]) -> Result<Self, ClientSpecError> {
        let authenticating = specs.iter().any(|s| s.token_sha256.is_some() || s.cert_san.is_some());
        let mut declared = HashMap::new();
        for spec in specs {
            let name = &spec.name;
            check_name(name).map_err(|why| ClientSpecError::Name(name.clone(), why))?;
            if !(1..=1000).contains(&spec.weight) {
                return Err(ClientSpecError::Weight(name.clone(), spec.weight));
            }
            if spec.max_in_flight == Some(0) {
                return Err(ClientSpecError::Limit(name.clone(), "max_in_flight"));
            }
            if spec.max_queued_jobs == Some(0) {
                return Err(ClientSpecError::Limit(name.clone(), "max_queued_jobs"));
            }
            let auth = |why: String| ClientSpecError::Auth(name.clone(), why);
            let token = spec.token_sha256.as_deref().map(parse_token_hash).transpose().map_err(auth)?;
            if spec.cert_san.as_deref().is_some_and(str::is_empty) {
                return Err(auth("cert_san is empty".into()));
            }
            let has_credential = token.is_some() || spec.cert_san.is_some();
            if authenticating && !has_credential {
                return Err(auth(
                    "has neither token_sha256 nor cert_san; once one client authenticates, every [[client]] must \
                     (calls are matched to their client by their credentials)"
                        .into(),
                ));
            }
            let tasks = match (&spec.tasks, has_credential) {
                (Some(patterns), true) => Some(permissions(patterns).map_err(auth)?),
                (None, true) => {
                    return Err(auth("tasks is missing: list the task patterns it may run (\"*\" for all)".into()));
                }
                (Some(_), false) => {
                    return Err(auth(
                        "tasks limits what an authenticated client may run; give it a token_sha256 or cert_san".into(),
                    ));
                }
                (None, false) => None,
            };
            if spec.admin && !has_credential {
                return Err(auth("admin = true needs a credential (token_sha256 or cert_san)".into()));
            }
            let client = Client {
                name: Arc::from(name.as_str()),
                weight: spec.weight,
                max_in_flight: spec.max_in_flight,
                max_queued_jobs: spec.max_queued_jobs,
                in_flight: AtomicUsize::new(0),
                declared: true,
                token,
                cert_san: spec.cert_san.clone(),
                tasks,
                admin: spec.admin,
            };
            let same_credential = |other: &Arc<Client>| {
                (client.token.is_some() && other.token == client.token)
                    || (client.cert_san.is_some() && other.cert_san == client.cert_san)
            };
            if let Some(other) = declared.values().find(|other| same_credential(other)) {
                return Err(auth(format!("has the same credential as client {:?}", other.name)));
            }
            if declared.insert(name.clone(), Arc::new(client)).is_some() {
                return Err(ClientSpecError::Twice(name.clone()));
            }
        }
        let by_certificate = declared.values().any(|c| c.cert_san.is_some());
        Ok(Self { declared, authenticating, by_certificate })
    }

    /// Whether calls must authenticate.
    pub fn authenticating(&self) -> bool {
        self.authenticating
    }

    /// Whether some client authenticates with a certificate name.
    pub fn by_certificate(&self) -> bool {
        self.by_certificate
    }

    /// The client whose token hashes to `hash` (compared in constant time
    /// with every client's, so the time taken says nothing of the tokens).
    pub fn by_token_hash(&self, hash: &[u8; 32]) -> Option<&Arc<Client>> {
        use subtle::ConstantTimeEq as _;
        let mut found = None;
        for client in self.declared.values() {
            if let Some(token) = &client.token
                && bool::from(token.ct_eq(hash))
            {
                found = Some(client);
            }
        }
        found
    }

    /// The client whose `cert_san` is one of `names`.
    pub fn by_certificate_name(&self, names: &[String]) -> Option<&Arc<Client>> {
        self.declared.values().find(|c| c.cert_san.as_ref().is_some_and(|san| names.contains(san)))
    }

    /// The declared clients.
    pub fn declared(&self) -> impl Iterator<Item = &Arc<Client>> {
        self.declared.values()
    }

    /// The client a call claims to come from (when clients do not
    /// authenticate): its `offload-client` value, else its peer's IP
    /// address, else one anonymous client.
    pub fn identify(&self, metadata: &MetadataMap, peer: Option<SocketAddr>) -> Result<Arc<Client>, CallError> {
        let name = match metadata.get(CLIENT_HEADER) {
            Some(value) => {
                let text = value
                    .to_str()
                    .map_err(|_| CallError::BadMetadata { key: CLIENT_HEADER, detail: "is not ASCII".into() })?;
                check_name(text)
                    .map_err(|why| CallError::BadMetadata { key: CLIENT_HEADER, detail: format!("{text:?} {why}") })?;
                text.to_string()
            }
            None => peer.map_or_else(String::new, |peer| peer.ip().to_string()),
        };
        Ok(self.named(&name))
    }

    /// The client called `name`: a declared one, or one of weight 1 and no
    /// limits (a job's run is scheduled as its submitter's).
    pub fn named(&self, name: &str) -> Arc<Client> {
        if let Some(client) = self.declared.get(name) {
            return Arc::clone(client);
        }
        Arc::new(Client {
            name: Arc::from(name),
            weight: 1,
            max_in_flight: None,
            max_queued_jobs: None,
            in_flight: AtomicUsize::new(0),
            declared: false,
            token: None,
            cert_san: None,
            tasks: None,
            admin: false,
        })
    }
}

/// A `token_sha256` value: 64 hex digits.
fn parse_token_hash(hex_digest: &str) -> Result<[u8; 32], String> {
    let mut hash = [0u8; 32];
    hex::decode_to_slice(hex_digest.trim(), &mut hash).map_err(|_| {
        "token_sha256 must be 64 hex digits (the SHA-256 of the token, e.g. `printf %s TOKEN | sha256sum`)".to_string()
    })?;
    Ok(hash)
}

/// Compiles `tasks` patterns (`*` any run of characters, `?` one, `[...]` a class).
fn permissions(patterns: &[String]) -> Result<Permissions, String> {
    if patterns.is_empty() {
        return Err("tasks is empty: the client could run nothing".into());
    }
    let mut set = GlobSetBuilder::new();
    for pattern in patterns {
        set.add(Glob::new(pattern).map_err(|e| format!("task pattern {pattern:?}: {e}"))?);
    }
    let set = set.build().map_err(|e| format!("task patterns: {e}"))?;
    Ok(Permissions { patterns: patterns.to_vec(), set })
}

/// The priority a call asks for in its metadata, else `default`.
pub fn priority(metadata: &MetadataMap, default: Priority) -> Result<Priority, CallError> {
    let Some(value) = metadata.get(PRIORITY_HEADER) else { return Ok(default) };
    value.to_str().ok().and_then(Priority::parse).ok_or_else(|| CallError::BadMetadata {
        key: PRIORITY_HEADER,
        detail: format!("{value:?} is not interactive or batch"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, weight: u32, max_in_flight: Option<usize>) -> ClientSpec {
        ClientSpec {
            name: name.into(),
            weight,
            max_in_flight,
            max_queued_jobs: None,
            token_sha256: None,
            cert_san: None,
            tasks: None,
            admin: false,
        }
    }

    fn metadata(pairs: &[(&'static str, &str)]) -> MetadataMap {
        let mut map = MetadataMap::new();
        for (key, value) in pairs {
            map.insert(*key, value.parse().unwrap());
        }
        map
    }

    #[test]
    fn a_call_is_its_declared_client_else_its_claim_else_its_peer() {
        let clients = Clients::new(&[spec("billing", 3, Some(2))]).unwrap();
        let peer: SocketAddr = "10.1.2.3:4567".parse().unwrap();
        let billing = clients.identify(&metadata(&[(CLIENT_HEADER, "billing")]), Some(peer)).unwrap();
        assert_eq!(
            (billing.name().as_ref(), billing.label(), billing.class(Priority::Batch).weight),
            ("billing", "billing", 3)
        );
        let claimed = clients.identify(&metadata(&[(CLIENT_HEADER, "search")]), Some(peer)).unwrap();
        assert_eq!((claimed.name().as_ref(), claimed.label()), ("search", OTHER_CLIENTS));
        let by_peer = clients.identify(&MetadataMap::new(), Some(peer)).unwrap();
        assert_eq!(by_peer.name().as_ref(), "10.1.2.3");
        let bad = clients.identify(&metadata(&[(CLIENT_HEADER, "a b")]), None).unwrap_err();
        assert!(bad.to_string().contains("offload-client"), "{bad}");
    }

    #[test]
    fn a_declared_limit_refuses_the_call_over_it_and_gives_places_back() {
        let clients = Clients::new(&[spec("billing", 1, Some(2))]).unwrap();
        let billing = clients.identify(&metadata(&[(CLIENT_HEADER, "billing")]), None).unwrap();
        let first = billing.enter().unwrap();
        let _second = billing.enter().unwrap();
        let refused = billing.enter().unwrap_err();
        assert_eq!(
            refused.to_string(),
            "client \"billing\" already has 2 calls in flight, its max_in_flight; retry when one ends"
        );
        assert_eq!(billing.in_flight(), 2);
        drop(first);
        assert!(billing.enter().is_ok());
    }

    #[test]
    fn bad_tables_and_priorities_are_refused() {
        assert!(matches!(Clients::new(&[spec("a", 0, None)]), Err(ClientSpecError::Weight(..))));
        assert!(matches!(Clients::new(&[spec("a", 1, Some(0))]), Err(ClientSpecError::Limit(_, "max_in_flight"))));
        let no_jobs = ClientSpec { max_queued_jobs: Some(0), ..spec("a", 1, None) };
        assert!(matches!(Clients::new(&[no_jobs]), Err(ClientSpecError::Limit(_, "max_queued_jobs"))));
        assert!(matches!(Clients::new(&[spec("a", 1, None), spec("a", 2, None)]), Err(ClientSpecError::Twice(_))));
        assert!(matches!(Clients::new(&[spec("other", 1, None)]), Err(ClientSpecError::Name(..))));
        assert_eq!(priority(&MetadataMap::new(), Priority::Batch).unwrap(), Priority::Batch);
        assert_eq!(
            priority(&metadata(&[(PRIORITY_HEADER, "interactive")]), Priority::Batch).unwrap(),
            Priority::Interactive
        );
        let err = priority(&metadata(&[(PRIORITY_HEADER, "urgent")]), Priority::Batch).unwrap_err();
        assert!(err.to_string().contains("is not interactive or batch"), "{err}");
    }
}
