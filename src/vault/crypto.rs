//! Envelope encryption. Each secret gets its own random data key (DEK); the secret is sealed
//! under the DEK and the DEK under the master key, both with XChaCha20-Poly1305 and with the
//! owner (org, provider, secret id) as associated data, so a ciphertext moved to another
//! record fails to open. Rotating the master key re-wraps DEKs without touching secrets.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

use crate::domain::{OrgId, SecretId};
use crate::settings::MasterKeyInput;
use crate::store::Sealed;

pub const KEY_FILE: &str = "master.key";
/// Written before a rotation re-wraps anything, so a crash mid-rotation never leaves records
/// wrapped under a key that exists nowhere.
pub const NEXT_KEY_FILE: &str = "master.key.next";

#[derive(Debug, thiserror::Error)]
pub enum VaultError {
    #[error("cannot read or write the master key file {path}: {detail}")]
    KeyFile { path: PathBuf, detail: String },
    #[error("a secret could not be opened (wrong master key, or the record was altered or moved)")]
    Open,
    #[error("the master key {0} that wrapped a secret is not loaded")]
    UnknownKey(String),
    #[error(
        "the master key file {path} is missing and CALLGATE_MASTER_KEY is not set, but {secrets} stored secret(s) \
         need the key they were sealed under: restore the file or set CALLGATE_MASTER_KEY (a new key could not open them)"
    )]
    MissingKey { path: PathBuf, secrets: usize },
    #[error(
        "the master key ({0}) is not random: it has fewer than {PATTERN_BYTES} distinct byte values, as no 32 random \
         bytes have, and no stored secret needs it; give one made by e.g. `openssl rand -base64 32` (or remove the \
         key file, and a random one is generated)"
    )]
    Patterned(String),
}

/// Fewer distinct byte values than this among 32 and a key was not drawn at random (all
/// zeros, a repeated byte or short pattern, a test value): 32 random bytes have about 30, and
/// fewer than 8 with a chance under 1 in 10^30.
const PATTERN_BYTES: usize = 8;

/// Whether a master key is made of a few byte values only, as no random key is.
pub fn patterned(key: &[u8; 32]) -> bool {
    let mut seen = [false; 256];
    for b in key {
        seen[usize::from(*b)] = true;
    }
    seen.iter().filter(|s| **s).count() < PATTERN_BYTES
}

struct MasterKey {
    id: String,
    key: Zeroizing<[u8; 32]>,
}

impl MasterKey {
    fn new(key: Zeroizing<[u8; 32]>) -> Self {
        // A fingerprint names the key in each record without revealing anything usable.
        let mut h = Sha256::new();
        h.update(b"callgate master key id\0");
        h.update(key.as_slice());
        let id = format!("mk_{}", &hex::encode(h.finalize())[..16]);
        Self { id, key }
    }
}

pub struct Keyring {
    current: MasterKey,
    others: HashMap<String, MasterKey>,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Keyring({}, [redacted])", self.current.id)
    }
}

pub fn generate_key() -> Zeroizing<[u8; 32]> {
    let mut k = Zeroizing::new([0u8; 32]);
    rand::rngs::OsRng.fill_bytes(k.as_mut_slice());
    k
}

fn key_err(path: &Path, e: impl std::fmt::Display) -> VaultError {
    VaultError::KeyFile { path: path.to_owned(), detail: e.to_string() }
}

pub fn read_key_file(path: &Path) -> Result<Zeroizing<[u8; 32]>, VaultError> {
    let text = crate::private_file::read(path).map_err(|e| key_err(path, e))?;
    MasterKeyInput::parse_base64("master key file", &text).map(|k| k.0).map_err(|e| key_err(path, e.problem))
}

pub fn write_key_file(path: &Path, key: &[u8; 32]) -> Result<(), VaultError> {
    let text = Zeroizing::new(B64.encode(key));
    crate::private_file::write(path, &text).map_err(|e| key_err(path, e))
}

/// Under `CALLGATE_MASTER_KEY` the data dir's key file is not read for the key. One that holds
/// another key (the one generated at a first start, or the one a rotation under the variable
/// replaced) is said at every start: without the variable it would be the key, and it opens
/// none of the secrets sealed since.
fn stale_key_file(data_dir: &Path, given: &[u8; 32]) {
    let path = data_dir.join(KEY_FILE);
    if !path.exists() {
        return;
    }
    let same = read_key_file(&path).is_ok_and(|k| bool::from(k.as_slice().ct_eq(given.as_slice())));
    if !same {
        tracing::warn!(
            path = %path.display(),
            "CALLGATE_MASTER_KEY is set and this master key file holds another key: it is not used, and \
             without the variable it would be, opening none of the secrets sealed under the variable's key. \
             Remove it, or keep it only where a backup taken under it is kept"
        );
    }
}

/// Where the master key came from, for a message about it.
fn source(given: Option<&MasterKeyInput>) -> String {
    match given {
        Some(_) => "CALLGATE_MASTER_KEY".to_owned(),
        None => KEY_FILE.to_owned(),
    }
}

impl Keyring {
    /// The operator's key if given; otherwise `<data_dir>/master.key`, generated on first start,
    /// that is while no secret is stored (`sealed` counts them): a key made later could open
    /// none of them. Returns whether a key was generated so the caller can say so.
    pub fn load(data_dir: &Path, given: Option<&MasterKeyInput>, sealed: usize) -> Result<(Keyring, bool), VaultError> {
        let mut generated = false;
        let current = match given {
            Some(k) => {
                stale_key_file(data_dir, &k.0);
                MasterKey::new(k.0.clone())
            }
            None => {
                let path = data_dir.join(KEY_FILE);
                if path.exists() {
                    MasterKey::new(read_key_file(&path)?)
                } else if sealed > 0 {
                    return Err(VaultError::MissingKey { path, secrets: sealed });
                } else {
                    fs::create_dir_all(data_dir).map_err(|e| key_err(data_dir, e))?;
                    let k = generate_key();
                    write_key_file(&path, &k)?;
                    generated = true;
                    MasterKey::new(k)
                }
            }
        };
        if patterned(&current.key) {
            // Refused while nothing depends on it; with secrets sealed under it, refusing would
            // lock them out of the rotation that mends it.
            if sealed == 0 {
                return Err(VaultError::Patterned(source(given)));
            }
            // Not even its id: with so few byte values to try, an id confirms a guess offline.
            tracing::warn!(
                "the master key is not random (it has fewer than {PATTERN_BYTES} distinct byte values): anyone who \
                 guesses it opens every stored secret; rotate to a random one with `callgate keys rotate`"
            );
        }
        let mut ring = Keyring { current, others: HashMap::new() };
        let next = data_dir.join(NEXT_KEY_FILE);
        if next.exists() {
            ring.add(read_key_file(&next)?);
        }
        Ok((ring, generated))
    }

    pub fn from_key(key: Zeroizing<[u8; 32]>) -> Self {
        Keyring { current: MasterKey::new(key), others: HashMap::new() }
    }

    pub fn add(&mut self, key: Zeroizing<[u8; 32]>) {
        let k = MasterKey::new(key);
        if k.id != self.current.id {
            self.others.insert(k.id.clone(), k);
        }
    }

    /// Every key this ring can open with, for a rotation to carry over.
    pub fn all_keys(&self) -> Vec<Zeroizing<[u8; 32]>> {
        std::iter::once(&self.current).chain(self.others.values()).map(|k| k.key.clone()).collect()
    }

    pub fn current_id(&self) -> &str {
        &self.current.id
    }

    /// Whether a secret sealed under master key `id` can be opened with this ring.
    pub fn holds(&self, id: &str) -> bool {
        self.by_id(id).is_ok()
    }

    fn by_id(&self, id: &str) -> Result<&MasterKey, VaultError> {
        if self.current.id == id {
            return Ok(&self.current);
        }
        self.others.get(id).ok_or_else(|| VaultError::UnknownKey(id.to_owned()))
    }

    pub fn seal(&self, owner: &Owner<'_>, plaintext: &[u8]) -> Sealed {
        let aad = owner.aad();
        let dek = generate_key();
        let nonce = random_nonce();
        let ciphertext = XChaCha20Poly1305::new(dek.as_slice().into())
            .encrypt(XNonce::from_slice(&nonce), Payload { msg: plaintext, aad: &aad })
            .expect("XChaCha20-Poly1305 encryption cannot fail for in-memory buffers");
        let (wrapped_dek, dek_nonce) = self.wrap(&self.current, &dek, &aad);
        Sealed {
            master_key_id: self.current.id.clone(),
            wrapped_dek,
            dek_nonce: dek_nonce.to_vec(),
            nonce: nonce.to_vec(),
            ciphertext,
        }
    }

    pub fn open(&self, owner: &Owner<'_>, sealed: &Sealed) -> Result<Zeroizing<Vec<u8>>, VaultError> {
        let aad = owner.aad();
        let dek = self.unwrap(sealed, &aad)?;
        if sealed.nonce.len() != 24 {
            return Err(VaultError::Open);
        }
        XChaCha20Poly1305::new(dek.as_slice().into())
            .decrypt(XNonce::from_slice(&sealed.nonce), Payload { msg: &sealed.ciphertext, aad: &aad })
            .map(Zeroizing::new)
            .map_err(|_| VaultError::Open)
    }

    /// Re-wraps the data key under the current master key; the secret's ciphertext is untouched.
    pub fn rewrap(&self, owner: &Owner<'_>, sealed: &Sealed) -> Result<Sealed, VaultError> {
        let aad = owner.aad();
        let dek = self.unwrap(sealed, &aad)?;
        let (wrapped_dek, dek_nonce) = self.wrap(&self.current, &dek, &aad);
        Ok(Sealed {
            master_key_id: self.current.id.clone(),
            wrapped_dek,
            dek_nonce: dek_nonce.to_vec(),
            ..sealed.clone()
        })
    }

    fn wrap(&self, mk: &MasterKey, dek: &[u8; 32], aad: &[u8]) -> (Vec<u8>, [u8; 24]) {
        let nonce = random_nonce();
        let mut wrap_aad = aad.to_vec();
        wrap_aad.extend_from_slice(mk.id.as_bytes());
        let wrapped = XChaCha20Poly1305::new(mk.key.as_slice().into())
            .encrypt(XNonce::from_slice(&nonce), Payload { msg: dek, aad: &wrap_aad })
            .expect("XChaCha20-Poly1305 encryption cannot fail for in-memory buffers");
        (wrapped, nonce)
    }

    fn unwrap(&self, sealed: &Sealed, aad: &[u8]) -> Result<Zeroizing<[u8; 32]>, VaultError> {
        let mk = self.by_id(&sealed.master_key_id)?;
        if sealed.dek_nonce.len() != 24 {
            return Err(VaultError::Open);
        }
        let mut wrap_aad = aad.to_vec();
        wrap_aad.extend_from_slice(mk.id.as_bytes());
        let dek = Zeroizing::new(
            XChaCha20Poly1305::new(mk.key.as_slice().into())
                .decrypt(XNonce::from_slice(&sealed.dek_nonce), Payload { msg: &sealed.wrapped_dek, aad: &wrap_aad })
                .map_err(|_| VaultError::Open)?,
        );
        let mut out = Zeroizing::new([0u8; 32]);
        if dek.len() != 32 {
            return Err(VaultError::Open);
        }
        out.copy_from_slice(&dek);
        Ok(out)
    }
}

fn random_nonce() -> [u8; 24] {
    let mut n = [0u8; 24];
    rand::rngs::OsRng.fill_bytes(&mut n);
    n
}

/// Whose secret this is; bound into the ciphertext as associated data.
pub struct Owner<'a> {
    pub org: &'a OrgId,
    pub provider: &'a str,
    pub secret: &'a SecretId,
}

impl Owner<'_> {
    fn aad(&self) -> Vec<u8> {
        format!("callgate/v1\0{}\0{}\0{}", self.org, self.provider, self.secret).into_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A key of few byte values (all zeros, a repeated pattern) is refused while no secret
    /// depends on it, whether given or in the key file; with secrets sealed under it, it is
    /// taken (with a warning) so that a rotation can move them off it.
    #[test]
    fn a_master_key_that_is_not_random_is_refused_while_nothing_is_sealed_under_it() {
        let mut counting = [0u8; 32];
        for (i, b) in counting.iter_mut().enumerate() {
            *b = (i % 7) as u8;
        }
        for weak in [[0u8; 32], [0xA5; 32], counting] {
            assert!(patterned(&weak));
            let dir = tempfile::tempdir().unwrap();
            let given = MasterKeyInput(Zeroizing::new(weak));
            let refused = Keyring::load(dir.path(), Some(&given), 0).unwrap_err();
            assert!(matches!(&refused, VaultError::Patterned(from) if from == "CALLGATE_MASTER_KEY"), "{refused}");
            assert!(Keyring::load(dir.path(), Some(&given), 1).is_ok());
            write_key_file(&dir.path().join(KEY_FILE), &weak).unwrap();
            assert!(matches!(Keyring::load(dir.path(), None, 0), Err(VaultError::Patterned(_))));
            assert!(Keyring::load(dir.path(), None, 3).is_ok());
        }
        let mut eight = [0u8; 32];
        for (i, b) in eight.iter_mut().enumerate() {
            *b = (i % 8) as u8;
        }
        assert!(!patterned(&eight));
        assert!(!patterned(&generate_key()));
        let dir = tempfile::tempdir().unwrap();
        assert!(Keyring::load(dir.path(), Some(&MasterKeyInput(generate_key())), 0).is_ok());
    }

    #[test]
    fn seal_open_and_moved_ciphertext_fails() {
        let ring = Keyring::from_key(generate_key());
        let org = OrgId::generate();
        let other = OrgId::generate();
        let sid = SecretId::generate();
        let owner = Owner { org: &org, provider: "openai", secret: &sid };
        let sealed = ring.seal(&owner, b"sk-secret-value");
        assert!(!sealed.ciphertext.windows(6).any(|w| w == b"secret"));
        assert_eq!(&ring.open(&owner, &sealed).unwrap()[..], b"sk-secret-value");
        let moved = Owner { org: &other, provider: "openai", secret: &sid };
        assert!(ring.open(&moved, &sealed).is_err());
        let other_provider = Owner { org: &org, provider: "anthropic", secret: &sid };
        assert!(ring.open(&other_provider, &sealed).is_err());
    }

    #[test]
    fn rewrap_under_a_new_key_keeps_the_secret() {
        let old = generate_key();
        let mut ring = Keyring::from_key(old.clone());
        let org = OrgId::generate();
        let sid = SecretId::generate();
        let owner = Owner { org: &org, provider: "twilio", secret: &sid };
        let sealed = ring.seal(&owner, b"token");
        let mut new_ring = Keyring::from_key(generate_key());
        new_ring.add(old);
        let re = new_ring.rewrap(&owner, &sealed).unwrap();
        assert_eq!(re.ciphertext, sealed.ciphertext);
        assert_ne!(re.master_key_id, sealed.master_key_id);
        let only_new = Keyring { current: MasterKey::new(new_ring.current.key.clone()), others: HashMap::new() };
        assert_eq!(&only_new.open(&owner, &re).unwrap()[..], b"token");
        ring = only_new;
        assert!(matches!(ring.open(&owner, &sealed), Err(VaultError::UnknownKey(_))));
    }
}
