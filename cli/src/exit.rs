//! Exit codes, and the one-line error every failure becomes.

use std::fmt;

/// The key was used before with a different command (sysexits EX_DATAERR).
pub const MISMATCH: u8 = 65;
/// A network service is unavailable: etcd or Redis could not be reached (sysexits EX_UNAVAILABLE).
pub const UNAVAILABLE: u8 = 69;
/// publish: bad input: a missing SRC, an unreadable or invalid file, a bad partition path; verify:
/// no dataset at DEST (sysexits EX_NOINPUT).
pub const BAD_INPUT: u8 = 66;
/// Something went wrong inside palisade itself or with the operating system (EX_SOFTWARE/EX_OSERR).
pub const INTERNAL: u8 = 70;
/// The command could not be started (EX_NOINPUT is taken by shells as "not found"; we use 127).
pub const NOT_STARTED: u8 = 127;
/// Not run because someone else holds the lock or runs the key (sysexits EX_TEMPFAIL).
pub const HELD: u8 = 75;
/// publish: another writer committed to DEST since this publish started; nothing of it is
/// visible: run it again (EX_CANTCREAT).
pub const CONFLICT: u8 = 73;
/// The lease (`run`) or the claim on the key (`once`) was lost while the command ran; the
/// command was terminated.
pub const LEASE_LOST: u8 = 76;
/// publish: fenced: a writer with a higher fencing token has already committed to DEST (or
/// DEST records a token and none was given); nothing of this run is visible (EX_NOPERM).
pub const FENCED: u8 = 77;
/// verify: the dataset is not sound (a named object missing, short or changed, or a decided
/// commit not rolled forward); also a manifest or object that is corrupt (sysexits EX_DATAERR).
pub const UNSOUND: u8 = 65;
/// The configuration is invalid: a bad flag value, an unreadable file (sysexits EX_CONFIG).
pub const CONFIG: u8 = 78;

/// The exit-code table, as printed by `--help`.
pub const TABLE: &str = "\
Exit codes:
  N    the command ran: its own exit code (128+SIGNAL when a signal ended it)
  2    bad command line
  65   once: the key was used before with a different command; verify: the dataset is not
       sound (or a manifest or object is corrupt)
  66   publish: bad input (missing SRC, invalid file, bad partition path); the error names the file;
       verify: no dataset at DEST (nothing was ever published there)
  69   etcd, Redis or publish's DEST could not be reached (also: DEST did not confirm the
       commit and could not be read back; run again, or check with `palisade verify`)
  70   internal or operating-system error
  73   publish: another writer committed to DEST meanwhile; nothing was published, run it again
  75   not run: the lock is held (or the key runs elsewhere) and the wait ran out
  76   the lease (run) or the claim on the key (once) was lost while the command ran: it
       got SIGTERM before the deadline and SIGKILL at it
  77   publish: fenced: a newer lock holder (higher fencing token) already published
  78   invalid configuration (a flag value, a TLS file, a store URL), or a server refused it
       (a TLS certificate, etcd's user/password): the message says which
  127  the command could not be started";

/// A failure of the `palisade` command: one line for stderr and the exit code.
#[derive(Debug)]
pub struct CliError {
    /// The process exit code.
    pub code: u8,
    /// One line, without the `palisade:` prefix.
    pub message: String,
}

impl CliError {
    /// A failure with this code and message.
    pub fn new(code: u8, message: impl Into<String>) -> Self {
        CliError {
            code,
            message: message.into(),
        }
    }

    /// An invalid configuration.
    pub fn config(message: impl Into<String>) -> Self {
        CliError::new(CONFIG, message)
    }
}

impl std::error::Error for CliError {}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // One line: nested causes are joined, never printed as a debug dump.
        f.write_str(&self.message.replace('\n', " "))
    }
}

impl From<palisade_lock::LockError> for CliError {
    fn from(error: palisade_lock::LockError) -> Self {
        use palisade_lock::LockError;
        if let LockError::Backend { source, .. } = &error
            && let Some(etcd) = source.downcast_ref::<etcd_client::Error>()
            && let Some(refusal) = crate::backend::etcd_refusal(etcd, None)
        {
            return refusal;
        }
        let code = match &error {
            LockError::Tls { .. } => CONFIG,
            LockError::Backend { .. } => UNAVAILABLE,
            LockError::Config { .. }
            | LockError::InvalidName { .. }
            | LockError::PermitsMismatch { .. } => CONFIG,
            LockError::Held { .. } | LockError::Timeout { .. } => HELD,
            LockError::Lost => LEASE_LOST,
            _ => INTERNAL,
        };
        CliError::new(code, chain(&error))
    }
}

impl From<palisade_idempotency::Error> for CliError {
    /// The exit code of every palisade-idempotency error, for `publish`, `manifest`, `verify`
    /// and `once` alike.
    fn from(error: palisade_idempotency::Error) -> Self {
        use palisade_idempotency::Error;
        let code = match &error {
            Error::Fenced { .. } | Error::FencingTokenRequired { .. } => FENCED,
            Error::Conflict { .. } | Error::LockTimeout { .. } => CONFLICT,
            Error::InvalidPartition { .. } | Error::Input { .. } | Error::Source { .. } => {
                BAD_INPUT
            }
            Error::Io { .. } | Error::Store { .. } | Error::Redis { .. } => UNAVAILABLE,
            // The command ran, but the store did not take its result: a later run runs it again.
            Error::NotRecorded { .. } => UNAVAILABLE,
            Error::ClaimLost { .. } => LEASE_LOST,
            Error::CommitUnknown { .. } => UNAVAILABLE,
            Error::UnsupportedUrl { .. }
            | Error::Config { .. }
            | Error::NestedDataset { .. }
            | Error::ConditionalPutUnsupported { .. }
            | Error::IncompatibleManifest { .. }
            | Error::InvalidKey { .. }
            | Error::MissingKey => CONFIG,
            Error::InProgress { .. } => HELD,
            Error::FingerprintMismatch { .. } => MISMATCH,
            Error::CorruptManifest { .. } | Error::CorruptObject { .. } => UNSOUND,
            _ => INTERNAL,
        };
        CliError::new(code, chain(&error))
    }
}

impl From<palisade_ratelimit::Error> for CliError {
    /// The exit code of every palisade-ratelimit error (`palisade limit`).
    fn from(error: palisade_ratelimit::Error) -> Self {
        use palisade_ratelimit::Error;
        let code = match &error {
            Error::Unavailable(_) | Error::Timeout(_) | Error::Redis(_) => UNAVAILABLE,
            Error::DeadlineExceeded(_) => HELD,
            Error::InvalidConfig { .. } | Error::CostExceedsLimit { .. } => CONFIG,
            _ => INTERNAL,
        };
        CliError::new(code, chain(&error))
    }
}

/// An error and its sources, as one line.
pub fn chain(error: &dyn std::error::Error) -> String {
    let mut line = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        source = cause.source();
    }
    line
}
