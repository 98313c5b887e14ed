//! Who is calling: an organization's API key, or the operator's admin token. Extractors, so a
//! handler's signature says what it needs.

use std::future::{ready, Ready};

use actix_web::dev::Payload;
use actix_web::http::header::AUTHORIZATION;
use actix_web::{web, FromRequest, HttpRequest};
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use base64::Engine;
use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::domain::{ApiKeyId, OrgId};
use crate::error::ApiError;
use crate::state::AppState;

pub const API_KEY_PREFIX: &str = "cg_";

/// A new random API key (shown once) and the hash that is stored.
pub fn new_api_key() -> (String, [u8; 32]) {
    let mut raw = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut raw);
    let key = format!("{API_KEY_PREFIX}{}", B64URL.encode(raw));
    let hash = hash_key(&key);
    (key, hash)
}

pub fn hash_key(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

fn bearer(req: &HttpRequest) -> Option<&str> {
    let mut given = req.headers().get_all(AUTHORIZATION);
    let v = given.next()?.to_str().ok()?;
    // Two credentials in one request are ambiguous: neither is taken.
    if given.next().is_some() {
        return None;
    }
    let (scheme, token) = v.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim()).filter(|t| !t.is_empty())
}

/// An authenticated organization.
#[derive(Clone, Debug)]
pub struct OrgAuth {
    pub org_id: OrgId,
    pub key_id: ApiKeyId,
}

impl FromRequest for OrgAuth {
    type Error = ApiError;
    type Future = Ready<Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        ready((|| {
            let state = req.app_data::<web::Data<AppState>>().ok_or_else(|| ApiError::internal("no app state"))?;
            let token = bearer(req).ok_or_else(ApiError::unauthorized)?;
            let hash = hash_key(token);
            let rec = state.store.api_key_by_hash(&hash)?.ok_or_else(ApiError::unauthorized)?;
            // The index lookup found it by hash; compare again in constant time so the answer
            // never depends on how many bytes matched.
            if !bool::from(rec.hash.ct_eq(&hash)) {
                return Err(ApiError::unauthorized());
            }
            Ok(OrgAuth { org_id: rec.org_id, key_id: rec.id })
        })())
    }
}

/// The operator, holding `CALLGATE_ADMIN_TOKEN`. With no token configured the admin API does
/// not exist (404), so an unset token can never be guessed.
pub struct AdminAuth;

impl FromRequest for AdminAuth {
    type Error = ApiError;
    type Future = Ready<Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        ready((|| {
            let state = req.app_data::<web::Data<AppState>>().ok_or_else(|| ApiError::internal("no app state"))?;
            let Some(expected) = state.settings.admin_token.as_ref() else {
                return Err(ApiError::not_found("resource"));
            };
            let given = bearer(req).ok_or_else(ApiError::unauthorized_admin)?;
            let a = Sha256::digest(given.as_bytes());
            let b = Sha256::digest(expected.expose().as_bytes());
            if bool::from(a.ct_eq(&b)) {
                Ok(AdminAuth)
            } else {
                Err(ApiError::unauthorized_admin())
            }
        })())
    }
}
