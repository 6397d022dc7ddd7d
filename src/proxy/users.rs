//! User accounts for the multi-user proxy: the users file, password hashing
//! and bearer-token lookup.
//!
//! Handles follow SillyTavern's kebab-case convention because the proxy uses
//! them as directory names; validating them here means no other module has to
//! worry about `../` or `/` sneaking into a path.
//!
//! Nothing in this module reads the clock or draws randomness: callers pass in
//! salts, so simulations stay deterministic and tests stay reproducible.

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
use hmac::digest::CtOutput;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use thiserror::Error;

/// Longest accepted handle; keeps directory names and cookies short.
pub const HANDLE_BYTES_MAX: usize = 32;
/// Longest accepted display name; it is only shown in the UI.
pub const NAME_BYTES_MAX: usize = 256;
/// Longest accepted password; argon2 cost grows with input length, so an
/// unbounded password would let an anonymous client burn CPU.
pub const PASSWORD_BYTES_MAX: usize = 1024;
/// Longest accepted bearer token, for the same reason as passwords.
pub const TOKEN_BYTES_MAX: usize = 1024;
/// Most users one store holds, enforced on load and create.
pub const USERS_MAX: usize = 10_000;
/// Largest users file `load` will read, so a corrupt file cannot exhaust memory.
pub const USERS_FILE_BYTES_MAX: u64 = 4 * 1024 * 1024;
/// Largest argon2 memory cost accepted from a stored hash (256 MiB): every
/// login allocates this much, so a typo in the users file must not take the
/// process down.
pub const HASH_MEMORY_KIB_MAX: u32 = 256 * 1024;
/// Largest argon2 iteration count accepted from a stored hash.
pub const HASH_ITERATIONS_MAX: u32 = 64;
/// Largest argon2 parallelism accepted from a stored hash.
pub const HASH_LANES_MAX: u32 = 16;
/// Argon2 memory cost for [`HashCost::Simulation`]: the minimum argon2 0.5
/// accepts (8 KiB per lane).
pub const SIMULATION_MEMORY_KIB: u32 = 8;
/// Length of a hex SHA-256 digest.
const TOKEN_DIGEST_HEX_BYTES: usize = 64;
/// Longest excerpt of untrusted text quoted in an error message.
const ERROR_QUOTE_BYTES_MAX: usize = 64;
/// Salt for the decoy hash computed when no user has a password; the result
/// is thrown away, so a fixed salt is fine.
const DECOY_SALT: [u8; 16] = [0; 16];

/// Problems with the users file or an admin operation.
#[derive(Debug, Error)]
pub enum UsersError {
    #[error(
        "invalid handle {handle:?}: {rule}; use 1 to {HANDLE_BYTES_MAX} lowercase letters, digits or '-', not starting or ending with '-'"
    )]
    InvalidHandle { handle: String, rule: &'static str },
    #[error("handle {0:?} is already taken; pick another handle or remove the duplicate entry")]
    DuplicateHandle(String),
    #[error("no user with handle {0:?}; check the spelling or list users first")]
    UnknownUser(String),
    #[error(
        "user {handle:?} has a display name of {bytes} bytes; shorten it to at most {NAME_BYTES_MAX}"
    )]
    NameTooLong { handle: String, bytes: usize },
    #[error(
        "user {handle:?} has an unusable password_hash ({reason}); set an argon2id PHC string made by tavernsim, or \"\" for no password"
    )]
    BadPasswordHash { handle: String, reason: String },
    #[error(
        "user {handle:?} has an invalid token_sha256; it must be {TOKEN_DIGEST_HEX_BYTES} lowercase hex digits (the SHA-256 of the token)"
    )]
    BadTokenDigest { handle: String },
    #[error(
        "users {first:?} and {second:?} have the same token_sha256; issue each user their own token"
    )]
    DuplicateToken { first: String, second: String },
    #[error("password is {bytes} bytes; use at most {PASSWORD_BYTES_MAX}")]
    PasswordTooLong { bytes: usize },
    #[error("could not hash the password ({0}); this is a bug, please report it")]
    Hash(String),
    #[error("too many users (limit {USERS_MAX}); delete unused accounts first")]
    TooManyUsers,
    #[error(
        "users file is {bytes} bytes; the limit is {USERS_FILE_BYTES_MAX}, so check that the path points at a users file"
    )]
    FileTooLarge { bytes: u64 },
    #[error(
        "invalid TOML: {0}; a users file holds [[user]] tables with keys handle, name, password_hash, token_sha256, enabled, admin, upstream_key"
    )]
    Parse(String),
    #[error("could not serialize the users ({0}); this is a bug, please report it")]
    Serialize(String),
    #[error("users file {}: {source}", path.display())]
    InFile {
        path: PathBuf,
        source: Box<UsersError>,
    },
    #[error("could not {action} {}: {source}; check the path and its permissions", path.display())]
    Io {
        path: PathBuf,
        action: &'static str,
        source: std::io::Error,
    },
    #[error("{} does not name a file; pass the path of the users file itself", path.display())]
    NotAFilePath { path: PathBuf },
}

/// Why a password login failed. Callers should show the client one generic
/// message for `UnknownUser` and `BadPassword` so handles stay private; the
/// distinction is for logs and tests.
#[derive(Clone, Copy, Debug, Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("no such user; check the handle or ask an admin to create an account")]
    UnknownUser,
    #[error("wrong password; try again or ask an admin to reset it")]
    BadPassword,
    #[error("account is disabled; ask an admin to enable it")]
    Disabled,
}

/// One account. Serialized as one `[[user]]` table in the users file.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct User {
    pub handle: String,
    /// Display name; an empty or missing name becomes the handle on load.
    #[serde(default)]
    pub name: String,
    /// argon2id PHC string; empty means the user cannot log in with a password
    /// (token-only account).
    #[serde(default)]
    pub password_hash: String,
    /// Lowercase hex SHA-256 of the user's bearer token; the token itself is
    /// never stored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_sha256: Option<String>,
    #[serde(default = "enabled_default")]
    pub enabled: bool,
    #[serde(default)]
    pub admin: bool,
    /// Per-user key for the upstream API, if the user brings their own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream_key: Option<String>,
}

/// Serde default for [`User::enabled`]: a listed user can log in unless the
/// file says otherwise.
fn enabled_default() -> bool {
    true
}

impl User {
    /// A user with the documented defaults: name = handle, enabled, not
    /// admin, no password, no token, no upstream key.
    pub fn new(handle: impl Into<String>) -> Self {
        let handle = handle.into();
        Self {
            name: handle.clone(),
            handle,
            password_hash: String::new(),
            token_sha256: None,
            enabled: true,
            admin: false,
            upstream_key: None,
        }
    }
}

/// Redacts secrets so a stray `{:?}` in a log line leaks nothing.
impl std::fmt::Debug for User {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let redact = |set: bool| if set { "<redacted>" } else { "<none>" };
        f.debug_struct("User")
            .field("handle", &self.handle)
            .field("name", &self.name)
            .field("password_hash", &redact(!self.password_hash.is_empty()))
            .field("token_sha256", &redact(self.token_sha256.is_some()))
            .field("enabled", &self.enabled)
            .field("admin", &self.admin)
            .field("upstream_key", &redact(self.upstream_key.is_some()))
            .finish()
    }
}

/// On-disk shape: `[[user]]` tables. Unknown keys are rejected so a typo such
/// as `[[users]]` or `enable = false` fails loudly instead of being ignored.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UsersFile {
    #[serde(default)]
    user: Vec<User>,
}

/// Borrowing twin of [`UsersFile`] so saving does not clone every user.
#[derive(Serialize)]
struct UsersFileRef<'a> {
    user: Vec<&'a User>,
}

/// Checks a handle against the kebab-case rule: 1..=[`HANDLE_BYTES_MAX`]
/// bytes of `[a-z0-9-]`, not starting or ending with `-`. This is what makes
/// handles safe to use as directory names.
pub fn validate_handle(h: &str) -> Result<(), UsersError> {
    let rule = if h.is_empty() {
        Some("handle is empty")
    } else if h.len() > HANDLE_BYTES_MAX {
        Some("handle is too long")
    } else if !h
        .bytes()
        .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'-'))
    {
        Some("handle may contain only lowercase ASCII letters, digits and '-'")
    } else if h.starts_with('-') || h.ends_with('-') {
        Some("handle must not start or end with '-'")
    } else {
        None
    };
    match rule {
        None => Ok(()),
        Some(rule) => Err(UsersError::InvalidHandle {
            handle: quote(h),
            rule,
        }),
    }
}

/// Cuts untrusted text to a bounded excerpt (on a char boundary) so error
/// messages cannot be used to flood logs.
fn quote(s: &str) -> String {
    let mut end = s.len().min(ERROR_QUOTE_BYTES_MAX);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}

/// How expensive a new password hash should be. The PHC string records its
/// own parameters, so verification always costs whatever the *stored* hash
/// was made with, regardless of the cost chosen for new hashes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HashCost {
    /// argon2id with the argon2 crate's defaults (m = 19 MiB, t = 2, p = 1),
    /// which follow the OWASP recommendation. Use for real accounts.
    Standard,
    /// The cheapest parameters argon2 accepts (m = 8 KiB, t = 1, p = 1) so a
    /// simulation can run thousands of logins quickly. Offers no real
    /// protection against offline guessing; never use for real accounts.
    Simulation,
}

impl HashCost {
    /// argon2 parameters for this cost level.
    fn params(self) -> Result<Params, UsersError> {
        match self {
            HashCost::Standard => Ok(Params::default()),
            HashCost::Simulation => Params::new(SIMULATION_MEMORY_KIB, 1, 1, None)
                .map_err(|e| UsersError::Hash(e.to_string())),
        }
    }
}

/// Hashes `password` with argon2id into a PHC string. The caller supplies the
/// salt (16 random bytes in production, seeded bytes in simulation) so this
/// module never draws randomness itself.
pub fn hash_password(
    password: &str,
    salt: &[u8; 16],
    cost: HashCost,
) -> Result<String, UsersError> {
    if password.len() > PASSWORD_BYTES_MAX {
        return Err(UsersError::PasswordTooLong {
            bytes: password.len(),
        });
    }
    let salt = SaltString::encode_b64(salt).map_err(|e| UsersError::Hash(e.to_string()))?;
    let argon2 = Argon2::new(Algorithm::Argon2id, Version::V0x13, cost.params()?);
    argon2
        .hash_password(password.as_bytes(), &salt)
        .map(|hash| hash.to_string())
        .map_err(|e| UsersError::Hash(e.to_string()))
}

/// Lowercase hex SHA-256 of a bearer token, the form stored in `token_sha256`.
/// A fast hash is enough because tokens are long random strings, not
/// human-chosen passwords.
pub fn token_digest(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// Checks that a stored PHC string is an argon2id hash this process can
/// verify without an absurd allocation.
fn check_password_hash(phc: &str) -> Result<(), String> {
    if phc.is_empty() {
        return Ok(());
    }
    let hash = PasswordHash::new(phc).map_err(|e| e.to_string())?;
    if hash.algorithm != Algorithm::Argon2id.ident() {
        return Err(format!(
            "algorithm is {}, expected argon2id",
            hash.algorithm
        ));
    }
    if hash.salt.is_none() || hash.hash.is_none() {
        return Err("salt or hash output is missing".to_owned());
    }
    let params = Params::try_from(&hash).map_err(|e| e.to_string())?;
    check_hash_limits(&params)
}

/// Rejects parameters above the HASH_*_MAX limits.
fn check_hash_limits(params: &Params) -> Result<(), String> {
    if params.m_cost() > HASH_MEMORY_KIB_MAX {
        return Err(format!("memory cost above {HASH_MEMORY_KIB_MAX} KiB"));
    }
    if params.t_cost() > HASH_ITERATIONS_MAX {
        return Err(format!("iteration count above {HASH_ITERATIONS_MAX}"));
    }
    if params.p_cost() > HASH_LANES_MAX {
        return Err(format!("parallelism above {HASH_LANES_MAX}"));
    }
    Ok(())
}

/// Whether a stored digest has the exact form [`token_digest`] produces, so
/// that lookups can compare like with like.
fn is_token_digest(d: &str) -> bool {
    d.len() == TOKEN_DIGEST_HEX_BYTES && d.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Validates one user record and fills in the default name.
fn normalize_user(mut user: User) -> Result<User, UsersError> {
    validate_handle(&user.handle)?;
    if user.name.is_empty() {
        user.name = user.handle.clone();
    }
    if user.name.len() > NAME_BYTES_MAX {
        return Err(UsersError::NameTooLong {
            handle: user.handle,
            bytes: user.name.len(),
        });
    }
    if let Err(reason) = check_password_hash(&user.password_hash) {
        return Err(UsersError::BadPasswordHash {
            handle: user.handle,
            reason,
        });
    }
    if user
        .token_sha256
        .as_deref()
        .is_some_and(|d| !is_token_digest(d))
    {
        return Err(UsersError::BadTokenDigest {
            handle: user.handle,
        });
    }
    Ok(user)
}

/// Verifies a password against a PHC string; any parse failure counts as a
/// mismatch. Cost follows the parameters recorded in the PHC string.
fn password_matches(phc: &str, password: &str) -> bool {
    match PasswordHash::new(phc) {
        Ok(hash) => Argon2::default()
            .verify_password(password.as_bytes(), &hash)
            .is_ok(),
        Err(_) => false,
    }
}

/// Decodes a stored hex digest for constant-time comparison.
fn decode_digest(hex_digest: &str) -> Option<CtOutput<Sha256>> {
    let mut bytes = [0u8; 32];
    hex::decode_to_slice(hex_digest, &mut bytes).ok()?;
    Some(CtOutput::new(bytes.into()))
}

/// All accounts, in handle order. Plain data: the caller wraps it in a lock
/// and re-reads the record on every request, so disabling a user takes effect
/// immediately.
#[derive(Clone, Debug, Default)]
pub struct UserStore {
    users: BTreeMap<String, User>,
}

impl UserStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Parses and validates a users file. Every handle, password hash and
    /// token digest is checked; the first problem is reported with the user
    /// it belongs to.
    pub fn from_toml_str(text: &str) -> Result<Self, UsersError> {
        let bytes = u64::try_from(text.len()).unwrap_or(u64::MAX);
        if bytes > USERS_FILE_BYTES_MAX {
            return Err(UsersError::FileTooLarge { bytes });
        }
        let file: UsersFile = toml::from_str(text)
            .map_err(|e| UsersError::Parse(e.to_string().trim_end().to_owned()))?;
        if file.user.len() > USERS_MAX {
            return Err(UsersError::TooManyUsers);
        }
        Self::from_users(file.user)
    }

    /// Builds a store from parsed records, validating each and rejecting
    /// duplicate handles and shared tokens.
    fn from_users(users: Vec<User>) -> Result<Self, UsersError> {
        let mut store = Self::new();
        let mut token_owners: HashMap<String, String> = HashMap::new();
        for user in users {
            let user = normalize_user(user)?;
            if store.users.contains_key(&user.handle) {
                return Err(UsersError::DuplicateHandle(user.handle));
            }
            if let Some(digest) = &user.token_sha256
                && let Some(first) = token_owners.insert(digest.clone(), user.handle.clone())
            {
                return Err(UsersError::DuplicateToken {
                    first,
                    second: user.handle,
                });
            }
            store.users.insert(user.handle.clone(), user);
        }
        Ok(store)
    }

    /// Renders the store as a users file, users in handle order.
    ///
    /// Returns a `Result` (not a bare `String`) so that a serializer failure
    /// can never be mistaken for an empty users file and saved.
    pub fn to_toml_string(&self) -> Result<String, UsersError> {
        let file = UsersFileRef {
            user: self.users.values().collect(),
        };
        toml::to_string(&file).map_err(|e| UsersError::Serialize(e.to_string()))
    }

    /// Reads and validates the users file at `path`. Files larger than
    /// [`USERS_FILE_BYTES_MAX`] are refused before being read in full.
    pub fn load(path: &Path) -> Result<Self, UsersError> {
        let io_err = |action, source| UsersError::Io {
            path: path.to_owned(),
            action,
            source,
        };
        let file = File::open(path).map_err(|e| io_err("open", e))?;
        let mut text = String::new();
        file.take(USERS_FILE_BYTES_MAX + 1)
            .read_to_string(&mut text)
            .map_err(|e| io_err("read", e))?;
        Self::from_toml_str(&text).map_err(|e| UsersError::InFile {
            path: path.to_owned(),
            source: Box::new(e),
        })
    }

    /// Writes the users file so that a crash at any moment leaves either the
    /// old or the new file, never a torn one: write a temp file in the same
    /// directory, fsync it, rename it over `path`, then fsync the directory so
    /// the rename itself survives power loss. On Unix the file is created with
    /// mode 0600 because it holds password hashes and upstream keys.
    pub fn save_atomic(&self, path: &Path) -> Result<(), UsersError> {
        let text = self.to_toml_string()?;
        let tmp = temp_path_for(path)?;
        let result = write_synced(&tmp, text.as_bytes()).and_then(|()| {
            fs::rename(&tmp, path).map_err(|source| UsersError::Io {
                path: path.to_owned(),
                action: "replace",
                source,
            })
        });
        if result.is_err() {
            // Best effort: the temp file is garbage either way.
            let _ = fs::remove_file(&tmp);
        }
        result?;
        sync_parent_dir(path)
    }

    /// The user with this handle, if any.
    pub fn get(&self, handle: &str) -> Option<&User> {
        self.users.get(handle)
    }

    /// All users in handle order (deterministic across runs).
    pub fn iter(&self) -> impl Iterator<Item = &User> {
        self.users.values()
    }

    /// Number of users.
    pub fn len(&self) -> usize {
        self.users.len()
    }

    /// Whether the store has no users.
    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    /// Checks a password login.
    ///
    /// To keep response time from revealing which handles exist, an unknown
    /// handle (or a token-only account) still costs one argon2 verification:
    /// against the first stored password hash in handle order, whose result
    /// is discarded. That decoy has exactly the parameters real logins in this
    /// store use, with no extra hashing at construction. A wrong password is
    /// reported before a disabled account so the disabled state is only
    /// revealed to someone who knows the password.
    pub fn verify_password(&self, handle: &str, password: &str) -> Result<&User, AuthError> {
        if password.len() > PASSWORD_BYTES_MAX {
            return Err(AuthError::BadPassword);
        }
        let Some(user) = self.users.get(handle) else {
            self.burn_decoy(password);
            return Err(AuthError::UnknownUser);
        };
        if user.password_hash.is_empty() {
            self.burn_decoy(password);
            return Err(AuthError::BadPassword);
        }
        if !password_matches(&user.password_hash, password) {
            return Err(AuthError::BadPassword);
        }
        if !user.enabled {
            return Err(AuthError::Disabled);
        }
        Ok(user)
    }

    /// Spends about as long as a real verification and discards the result.
    fn burn_decoy(&self, password: &str) {
        let decoy = self.users.values().find(|u| !u.password_hash.is_empty());
        let spent = match decoy {
            Some(user) => password_matches(&user.password_hash, password),
            None => hash_password(password, &DECOY_SALT, HashCost::Simulation).is_ok(),
        };
        std::hint::black_box(spent);
    }

    /// The enabled user whose token digest matches `token`. Every stored
    /// digest is compared in constant time and the scan never stops early, so
    /// timing does not reveal how close a guess came.
    pub fn user_for_token(&self, token: &str) -> Option<&User> {
        if token.is_empty() || token.len() > TOKEN_BYTES_MAX {
            return None;
        }
        let presented = CtOutput::<Sha256>::new(Sha256::digest(token.as_bytes()));
        let mut found = None;
        for user in self.users.values() {
            let stored = user.token_sha256.as_deref().and_then(decode_digest);
            if stored.is_some_and(|d| d == presented) && found.is_none() {
                found = Some(user);
            }
        }
        found.filter(|u| u.enabled)
    }

    /// Adds a user after the same checks `load` applies; an empty name
    /// becomes the handle.
    pub fn create(&mut self, user: User) -> Result<(), UsersError> {
        if self.users.len() >= USERS_MAX {
            return Err(UsersError::TooManyUsers);
        }
        let user = normalize_user(user)?;
        if self.users.contains_key(&user.handle) {
            return Err(UsersError::DuplicateHandle(user.handle));
        }
        if let Some(digest) = &user.token_sha256 {
            let owner = self
                .users
                .values()
                .find(|u| u.token_sha256.as_ref() == Some(digest));
            if let Some(owner) = owner {
                return Err(UsersError::DuplicateToken {
                    first: owner.handle.clone(),
                    second: user.handle,
                });
            }
        }
        self.users.insert(user.handle.clone(), user);
        Ok(())
    }

    /// Enables or disables login for a user.
    pub fn set_enabled(&mut self, handle: &str, enabled: bool) -> Result<(), UsersError> {
        self.get_mut(handle)?.enabled = enabled;
        Ok(())
    }

    /// Grants or revokes admin rights.
    pub fn set_admin(&mut self, handle: &str, admin: bool) -> Result<(), UsersError> {
        self.get_mut(handle)?.admin = admin;
        Ok(())
    }

    /// Removes a user and returns the record (e.g. for an audit log).
    pub fn delete(&mut self, handle: &str) -> Result<User, UsersError> {
        self.users
            .remove(handle)
            .ok_or_else(|| UsersError::UnknownUser(quote(handle)))
    }

    /// Mutable access for the admin setters; private so callers cannot
    /// bypass validation.
    fn get_mut(&mut self, handle: &str) -> Result<&mut User, UsersError> {
        self.users
            .get_mut(handle)
            .ok_or_else(|| UsersError::UnknownUser(quote(handle)))
    }
}

/// Distinguishes temp files of concurrent saves within one process.
static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// `<dir>/.<name>.tmp.<pid>.<n>`: same directory as the target so the rename
/// stays on one filesystem and is atomic.
fn temp_path_for(path: &Path) -> Result<PathBuf, UsersError> {
    let Some(name) = path.file_name() else {
        return Err(UsersError::NotAFilePath {
            path: path.to_owned(),
        });
    };
    let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".tmp.{}.{n}", std::process::id()));
    Ok(path.with_file_name(tmp_name))
}

/// Creates `tmp` (never reusing an existing file), writes `bytes` and fsyncs.
fn write_synced(tmp: &Path, bytes: &[u8]) -> Result<(), UsersError> {
    let io_err = |action, source| UsersError::Io {
        path: tmp.to_owned(),
        action,
        source,
    };
    let mut options = OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(tmp).map_err(|e| io_err("create", e))?;
    file.write_all(bytes).map_err(|e| io_err("write", e))?;
    file.sync_all().map_err(|e| io_err("fsync", e))
}

/// Fsyncs the directory holding `path` so a completed rename is durable.
/// Only Unix supports opening a directory for this; elsewhere it is a no-op.
fn sync_parent_dir(path: &Path) -> Result<(), UsersError> {
    #[cfg(unix)]
    {
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        let io_err = |source| UsersError::Io {
            path: dir.to_owned(),
            action: "fsync directory",
            source,
        };
        File::open(dir)
            .map_err(io_err)?
            .sync_all()
            .map_err(io_err)?;
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fixed salt for tests; production salts come from the caller's RNG.
    const SALT: [u8; 16] = *b"0123456789abcdef";

    fn sim_hash(password: &str) -> String {
        hash_password(password, &SALT, HashCost::Simulation).expect("hash")
    }

    fn user_with(handle: &str, password: &str, token: Option<&str>) -> User {
        User {
            password_hash: sim_hash(password),
            token_sha256: token.map(token_digest),
            ..User::new(handle)
        }
    }

    /// Store with alice (enabled), bob (disabled) and carol (token only).
    fn sample_store() -> UserStore {
        let mut store = UserStore::new();
        store
            .create(user_with("alice", "alice-pw", Some("tok-alice")))
            .unwrap();
        let mut bob = user_with("bob", "bob-pw", Some("tok-bob"));
        bob.enabled = false;
        store.create(bob).unwrap();
        let carol = User {
            token_sha256: Some(token_digest("tok-carol")),
            ..User::new("carol")
        };
        store.create(carol).unwrap();
        store
    }

    /// Unique scratch directory under the system temp dir.
    fn temp_dir(test: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "tavernsim-users-{test}-{}-{}",
            std::process::id(),
            TEMP_COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn handle_validation_table() {
        // (handle, valid?)
        let cases: &[(&str, bool)] = &[
            ("a", true),
            ("alice", true),
            ("alice-2", true),
            ("0", true),
            ("a-b-c", true),
            ("a--b", true),
            (&"a".repeat(HANDLE_BYTES_MAX), true),
            (&"a".repeat(HANDLE_BYTES_MAX + 1), false),
            ("", false),
            ("-", false),
            ("-a", false),
            ("a-", false),
            ("../x", false),
            ("..", false),
            ("a/b", false),
            ("a\\b", false),
            ("Alice", false),
            ("a_b", false),
            ("a b", false),
            ("a.b", false),
            ("é", false),
            ("a\0", false),
        ];
        for (handle, valid) in cases {
            assert_eq!(validate_handle(handle).is_ok(), *valid, "handle {handle:?}");
        }
    }

    #[test]
    fn handle_error_names_the_rule() {
        let message = validate_handle("Alice").unwrap_err().to_string();
        assert!(message.contains("lowercase"), "{message}");
        let message = validate_handle("-a").unwrap_err().to_string();
        assert!(message.contains("start or end"), "{message}");
        let message = validate_handle("").unwrap_err().to_string();
        assert!(message.contains("empty"), "{message}");
    }

    #[test]
    fn long_handle_is_quoted_truncated() {
        let message = validate_handle(&"é".repeat(10_000))
            .unwrap_err()
            .to_string();
        assert!(message.len() < 1_000, "{} bytes", message.len());
    }

    #[test]
    fn simulation_hash_records_cheap_params() {
        let phc = sim_hash("pw");
        assert!(phc.starts_with("$argon2id$v=19$m=8,t=1,p=1$"), "{phc}");
        assert!(password_matches(&phc, "pw"));
        assert!(!password_matches(&phc, "pw2"));
    }

    #[test]
    fn standard_hash_records_default_params() {
        let phc = hash_password("pw", &SALT, HashCost::Standard).unwrap();
        assert!(phc.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{phc}");
        assert!(password_matches(&phc, "pw"));
    }

    #[test]
    fn hash_depends_on_salt() {
        let other = hash_password("pw", &[7; 16], HashCost::Simulation).unwrap();
        assert_ne!(sim_hash("pw"), other);
        assert_eq!(sim_hash("pw"), sim_hash("pw"));
    }

    #[test]
    fn overlong_password_is_rejected() {
        let long = "x".repeat(PASSWORD_BYTES_MAX + 1);
        assert!(matches!(
            hash_password(&long, &SALT, HashCost::Simulation),
            Err(UsersError::PasswordTooLong { .. })
        ));
    }

    #[test]
    fn token_digest_is_hex_sha256() {
        assert_eq!(
            token_digest("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn toml_defaults_apply() {
        let store = UserStore::from_toml_str("[[user]]\nhandle = \"dave\"\n").unwrap();
        let dave = store.get("dave").unwrap();
        assert_eq!(dave.name, "dave");
        assert!(dave.enabled);
        assert!(!dave.admin);
        assert!(dave.password_hash.is_empty());
        assert_eq!(dave.token_sha256, None);
        assert_eq!(dave.upstream_key, None);
    }

    #[test]
    fn empty_file_is_empty_store() {
        assert!(UserStore::from_toml_str("").unwrap().is_empty());
    }

    #[test]
    fn toml_round_trip_keeps_every_field() {
        let mut store = sample_store();
        let mut erin = user_with("erin", "pw", None);
        erin.name = "Erin \"E\" Smith\n".to_owned();
        erin.admin = true;
        erin.upstream_key = Some("sk-erin".to_owned());
        store.create(erin).unwrap();
        let text = store.to_toml_string().unwrap();
        let again = UserStore::from_toml_str(&text).unwrap();
        let before: Vec<_> = store.iter().collect();
        let after: Vec<_> = again.iter().collect();
        assert_eq!(before, after);
    }

    #[test]
    fn iter_is_in_handle_order() {
        let text =
            "[[user]]\nhandle = \"zed\"\n[[user]]\nhandle = \"amy\"\n[[user]]\nhandle = \"max\"\n";
        let store = UserStore::from_toml_str(text).unwrap();
        let handles: Vec<_> = store.iter().map(|u| u.handle.as_str()).collect();
        assert_eq!(handles, ["amy", "max", "zed"]);
        assert_eq!(store.len(), 3);
    }

    #[test]
    fn duplicate_handles_are_named() {
        let text = "[[user]]\nhandle = \"amy\"\n[[user]]\nhandle = \"amy\"\n";
        let err = UserStore::from_toml_str(text).unwrap_err();
        assert!(
            matches!(&err, UsersError::DuplicateHandle(h) if h == "amy"),
            "{err}"
        );
        assert!(err.to_string().contains("\"amy\""));
    }

    #[test]
    fn duplicate_tokens_are_rejected() {
        let d = token_digest("same");
        let text = format!(
            "[[user]]\nhandle = \"a\"\ntoken_sha256 = \"{d}\"\n[[user]]\nhandle = \"b\"\ntoken_sha256 = \"{d}\"\n"
        );
        assert!(matches!(
            UserStore::from_toml_str(&text),
            Err(UsersError::DuplicateToken { .. })
        ));
        let mut store = sample_store();
        let thief = User {
            token_sha256: Some(token_digest("tok-alice")),
            ..User::new("mallory")
        };
        assert!(matches!(
            store.create(thief),
            Err(UsersError::DuplicateToken { .. })
        ));
    }

    #[test]
    fn bad_entries_name_the_user() {
        let cases = [
            (
                "[[user]]\nhandle = \"amy\"\npassword_hash = \"nope\"\n",
                "amy",
            ),
            (
                "[[user]]\nhandle = \"ann\"\npassword_hash = \"$argon2i$v=19$m=8,t=1,p=1$MDEyMzQ1Njc4OWFiY2RlZg$6sy2kHgHI+LqtuZh0w4n0g\"\n",
                "ann",
            ),
            (
                "[[user]]\nhandle = \"abe\"\npassword_hash = \"$argon2id$v=19$m=4294967295,t=1,p=1$MDEyMzQ1Njc4OWFiY2RlZg$6sy2kHgHI+LqtuZh0w4n0g\"\n",
                "abe",
            ),
            ("[[user]]\nhandle = \"al\"\ntoken_sha256 = \"ABC\"\n", "al"),
        ];
        for (text, handle) in cases {
            let message = UserStore::from_toml_str(text).unwrap_err().to_string();
            assert!(message.contains(&format!("{handle:?}")), "{message}");
        }
    }

    #[test]
    fn bad_files_are_rejected() {
        let cases = [
            "[[user]]\nhandle = \"../x\"\n",
            "[[user]]\nhandle = \"Amy\"\n",
            "[[users]]\nhandle = \"amy\"\n",
            "[[user]]\nhandle = \"amy\"\nenable = false\n",
            "[[user]]\nname = \"no handle\"\n",
            "not toml at all [",
            "[[user]]\nhandle = \"amy\"\nenabled = \"yes\"\n",
        ];
        for text in cases {
            assert!(UserStore::from_toml_str(text).is_err(), "{text:?}");
        }
    }

    #[test]
    fn oversized_text_is_rejected() {
        let len = usize::try_from(USERS_FILE_BYTES_MAX).unwrap() + 1;
        let text = format!("#{}", "x".repeat(len));
        assert!(matches!(
            UserStore::from_toml_str(&text),
            Err(UsersError::FileTooLarge { .. })
        ));
    }

    #[test]
    fn too_many_users_is_rejected() {
        let mut text = String::new();
        for i in 0..=USERS_MAX {
            text.push_str(&format!("[[user]]\nhandle = \"u{i}\"\n"));
        }
        assert!(matches!(
            UserStore::from_toml_str(&text),
            Err(UsersError::TooManyUsers)
        ));
        text.truncate(text.rfind("[[user]]").unwrap());
        let mut store = UserStore::from_toml_str(&text).unwrap();
        assert_eq!(store.len(), USERS_MAX);
        assert!(matches!(
            store.create(User::new("one-more")),
            Err(UsersError::TooManyUsers)
        ));
    }

    #[test]
    fn save_atomic_then_load_round_trips() {
        let dir = temp_dir("save");
        let path = dir.join("users.toml");
        let store = sample_store();
        store.save_atomic(&path).unwrap();
        let loaded = UserStore::load(&path).unwrap();
        assert_eq!(
            store.iter().collect::<Vec<_>>(),
            loaded.iter().collect::<Vec<_>>()
        );
        // Overwrite with a smaller store: no stale bytes, no leftover temp file.
        let mut smaller = loaded;
        smaller.delete("alice").unwrap();
        smaller.save_atomic(&path).unwrap();
        let reloaded = UserStore::load(&path).unwrap();
        assert_eq!(reloaded.len(), 2);
        assert!(reloaded.get("alice").is_none());
        let entries: Vec<_> = fs::read_dir(&dir).unwrap().collect();
        assert_eq!(entries.len(), 1, "temp files left behind: {entries:?}");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn load_errors_name_the_file() {
        let dir = temp_dir("load");
        let missing = dir.join("missing.toml");
        let message = UserStore::load(&missing).unwrap_err().to_string();
        assert!(message.contains("missing.toml"), "{message}");
        let bad = dir.join("bad.toml");
        fs::write(&bad, "[[user]]\nhandle = \"x\"\n[[user]]\nhandle = \"x\"\n").unwrap();
        let err = UserStore::load(&bad).unwrap_err();
        assert!(err.to_string().contains("bad.toml"), "{err}");
        assert!(
            matches!(&err, UsersError::InFile { source, .. } if matches!(**source, UsersError::DuplicateHandle(_)))
        );
        let big = dir.join("big.toml");
        let len = usize::try_from(USERS_FILE_BYTES_MAX).unwrap() + 10;
        fs::write(&big, "#".repeat(len)).unwrap();
        assert!(
            UserStore::load(&big)
                .unwrap_err()
                .to_string()
                .contains("limit")
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn save_to_directory_path_fails_cleanly() {
        let dir = temp_dir("dirpath");
        assert!(sample_store().save_atomic(&dir.join("..")).is_err());
        assert!(sample_store().save_atomic(&dir).is_err());
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 0);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn password_outcomes_are_distinguished() {
        let store = sample_store();
        assert_eq!(
            store.verify_password("alice", "alice-pw").unwrap().handle,
            "alice"
        );
        assert_eq!(
            store.verify_password("alice", "wrong").unwrap_err(),
            AuthError::BadPassword
        );
        assert_eq!(
            store.verify_password("nobody", "alice-pw").unwrap_err(),
            AuthError::UnknownUser
        );
        assert_eq!(
            store.verify_password("bob", "bob-pw").unwrap_err(),
            AuthError::Disabled
        );
        // Without the password, a disabled account looks like a wrong password.
        assert_eq!(
            store.verify_password("bob", "wrong").unwrap_err(),
            AuthError::BadPassword
        );
        // Token-only accounts cannot log in with a password, even an empty one.
        assert_eq!(
            store.verify_password("carol", "").unwrap_err(),
            AuthError::BadPassword
        );
        let long = "x".repeat(PASSWORD_BYTES_MAX + 1);
        assert_eq!(
            store.verify_password("alice", &long).unwrap_err(),
            AuthError::BadPassword
        );
    }

    #[test]
    fn unknown_user_on_empty_store() {
        assert_eq!(
            UserStore::new().verify_password("x", "y").unwrap_err(),
            AuthError::UnknownUser
        );
    }

    #[test]
    fn token_lookup() {
        let mut store = sample_store();
        assert_eq!(store.user_for_token("tok-alice").unwrap().handle, "alice");
        assert_eq!(store.user_for_token("tok-carol").unwrap().handle, "carol");
        assert!(store.user_for_token("tok-bob").is_none(), "bob is disabled");
        assert!(store.user_for_token("tok-nobody").is_none());
        assert!(store.user_for_token("").is_none());
        assert!(
            store
                .user_for_token(&"t".repeat(TOKEN_BYTES_MAX + 1))
                .is_none()
        );
        store.set_enabled("bob", true).unwrap();
        assert_eq!(store.user_for_token("tok-bob").unwrap().handle, "bob");
        store.set_enabled("alice", false).unwrap();
        assert!(store.user_for_token("tok-alice").is_none());
    }

    #[test]
    fn admin_operations() {
        let mut store = sample_store();
        assert!(
            matches!(store.create(User::new("alice")), Err(UsersError::DuplicateHandle(h)) if h == "alice")
        );
        assert!(matches!(
            store.create(User::new("Bad")),
            Err(UsersError::InvalidHandle { .. })
        ));
        let mut loud = User::new("loud");
        loud.name = "x".repeat(NAME_BYTES_MAX + 1);
        assert!(matches!(
            store.create(loud),
            Err(UsersError::NameTooLong { .. })
        ));
        let mut no_name = User::new("dan");
        no_name.name.clear();
        store.create(no_name).unwrap();
        assert_eq!(store.get("dan").unwrap().name, "dan");

        store.set_admin("dan", true).unwrap();
        assert!(store.get("dan").unwrap().admin);
        store.set_admin("dan", false).unwrap();
        assert!(!store.get("dan").unwrap().admin);
        store.set_enabled("dan", false).unwrap();
        assert!(!store.get("dan").unwrap().enabled);

        let removed = store.delete("dan").unwrap();
        assert_eq!(removed.handle, "dan");
        assert!(store.get("dan").is_none());
        assert!(matches!(store.delete("dan"), Err(UsersError::UnknownUser(h)) if h == "dan"));
        assert!(matches!(
            store.set_enabled("ghost", true),
            Err(UsersError::UnknownUser(_))
        ));
        assert!(matches!(
            store.set_admin("ghost", true),
            Err(UsersError::UnknownUser(_))
        ));
    }

    #[test]
    fn debug_redacts_secrets() {
        let mut user = user_with("alice", "pw", Some("tok"));
        user.upstream_key = Some("sk-secret".to_owned());
        let shown = format!("{user:?}");
        assert!(!shown.contains("sk-secret"), "{shown}");
        assert!(!shown.contains("argon2"), "{shown}");
        assert!(!shown.contains(&token_digest("tok")), "{shown}");
        assert!(shown.contains("alice"));
    }
}
