//! Pages of lists. Every list the API serves is read a page at a time: a caller asks for up to
//! [`PageRequest::size`] rows after the position a page token names, and gets the rows with the
//! token of the next page.
//!
//! Pages are keyset pages, not offsets: a token holds the sort key of the last row returned and
//! the next page starts strictly after it, in the list's own order. Rows inserted between two
//! pages therefore never shift the rows still to come: nothing is returned twice and nothing
//! already there is skipped. A token is only a position; whoever uses it gets the rows its
//! filter (and so its authorization) allows, as on the first page.
//!
//! A token is base64url (no padding) of JSON `{"list": ..., "after": ...}`. It names its list
//! so that a token of one list handed to another is refused rather than read as a position
//! there.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::{Result, StoreError};

/// Rows in a page when the request asks for 0 (what clients that predate pages send).
pub const DEFAULT_PAGE_SIZE: u32 = 100;

/// Most rows a page may hold; a request for more is refused.
pub const MAX_PAGE_SIZE: u32 = 1_000;

/// Longest page token accepted: every real one is far shorter.
const MAX_TOKEN_LEN: usize = 1_024;

/// Which page of a list to read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PageRequest {
    /// Most rows to return: 0 means [`DEFAULT_PAGE_SIZE`]; above [`MAX_PAGE_SIZE`] is refused.
    pub size: u32,
    /// Where to continue: the `next_token` of the previous page, or empty for the first page.
    pub token: String,
}

impl PageRequest {
    /// The first page, of up to `size` rows (0: the default).
    pub fn first(size: u32) -> PageRequest {
        PageRequest { size, token: String::new() }
    }

    /// The page after the one that returned `token`.
    pub fn after(size: u32, token: impl Into<String>) -> PageRequest {
        PageRequest { size, token: token.into() }
    }
}

/// One page of a list.
#[derive(Debug, Clone, PartialEq)]
pub struct Page<T> {
    /// The rows, in the list's order.
    pub items: Vec<T>,
    /// The token of the next page; empty when this page is the last.
    pub next_token: String,
}

/// The lists that page, each with its own sort key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum List {
    /// Jobs, newest (highest id) first; key: the job id.
    Jobs,
    /// Nodes by name; key: the name.
    Nodes,
    /// Projects by name; key: the name.
    Projects,
    /// API keys oldest first; key: (created_ms, id).
    Keys,
    /// A project's secret names, sorted; key: the name.
    Secrets,
    /// A job's artifacts by task, path, newest attempt first; key: (task id, path, attempt,
    /// row id).
    Artifacts,
    /// Audit records by id; key: the id.
    Audit,
}

impl List {
    fn name(self) -> &'static str {
        match self {
            List::Jobs => "jobs",
            List::Nodes => "nodes",
            List::Projects => "projects",
            List::Keys => "keys",
            List::Secrets => "secrets",
            List::Artifacts => "artifacts",
            List::Audit => "audit",
        }
    }
}

/// A checked page request: how many rows, after which key.
#[derive(Debug)]
pub(crate) struct Position<K> {
    /// Rows the page holds at most.
    pub(crate) size: u32,
    /// The sort key of the last row of the previous page; `None` on the first page.
    pub(crate) after: Option<K>,
}

impl<K> Position<K> {
    /// Rows to read: one more than the page holds, so that whether a next page exists is known
    /// without a second query (and the last page never hands out a token of an empty page).
    pub(crate) fn limit(&self) -> i64 {
        i64::from(self.size) + 1
    }
}

#[derive(Serialize, Deserialize)]
struct Token<K> {
    list: String,
    after: K,
}

/// Checks `req` for `list` and decodes its position. A size over the cap, a token that is not
/// one this store made, or one of another list is [`StoreError::Invalid`].
pub(crate) fn open<K: DeserializeOwned>(list: List, req: &PageRequest) -> Result<Position<K>> {
    let size = match req.size {
        0 => DEFAULT_PAGE_SIZE,
        n if n > MAX_PAGE_SIZE => {
            return Err(invalid("page size", format!("{n} is over the most a page holds, {MAX_PAGE_SIZE}")));
        }
        n => n,
    };
    if req.token.is_empty() {
        return Ok(Position { size, after: None });
    }
    let garbled = || {
        invalid("page token", "it is not a token this server gave out; list again from the first page".into())
    };
    if req.token.len() > MAX_TOKEN_LEN {
        return Err(garbled());
    }
    let bytes = URL_SAFE_NO_PAD.decode(req.token.as_bytes()).map_err(|_| garbled())?;
    // The list name first, apart from the key: a token of another list has another key type,
    // and should say so rather than fail to decode.
    let named: Token<serde_json::Value> = serde_json::from_slice(&bytes).map_err(|_| garbled())?;
    if named.list != list.name() {
        return Err(invalid(
            "page token",
            format!(
                "it continues a list of {}, not of {}; list again from the first page",
                named.list,
                list.name()
            ),
        ));
    }
    let after = serde_json::from_value(named.after).map_err(|_| garbled())?;
    Ok(Position { size, after: Some(after) })
}

/// The page of `rows` (read with [`Position::limit`]): at most `size` of them, and the token
/// after the last one kept when more rows followed.
pub(crate) fn close<T, K: Serialize>(
    list: List,
    at: &Position<K>,
    mut rows: Vec<T>,
    key: impl Fn(&T) -> K,
) -> Result<Page<T>> {
    let size = at.size as usize;
    if rows.len() <= size {
        return Ok(Page { items: rows, next_token: String::new() });
    }
    rows.truncate(size);
    let next_token = match rows.last() {
        Some(last) => token(list, &key(last))?,
        None => String::new(),
    };
    Ok(Page { items: rows, next_token })
}

fn token<K: Serialize>(list: List, after: &K) -> Result<String> {
    let json = serde_json::to_vec(&Token { list: list.name().to_owned(), after })
        .map_err(|e| StoreError::Corrupt { what: "page token", detail: e.to_string() })?;
    Ok(URL_SAFE_NO_PAD.encode(json))
}

fn invalid(what: &'static str, detail: String) -> StoreError {
    StoreError::Invalid { what, detail }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_names_its_list_and_position() {
        let at: Position<i64> = open(List::Jobs, &PageRequest::first(2)).unwrap();
        let page = close(List::Jobs, &at, vec![9, 8, 7], |id| *id).unwrap();
        assert_eq!(page.items, vec![9, 8]);
        let next: Position<i64> = open(List::Jobs, &PageRequest::after(2, &page.next_token)).unwrap();
        assert_eq!(next.after, Some(8));
        let other = open::<String>(List::Nodes, &PageRequest::after(2, &page.next_token)).unwrap_err();
        assert!(other.to_string().contains("a list of jobs, not of nodes"), "{other}");
    }

    #[test]
    fn the_last_page_has_no_token() {
        let at: Position<i64> = open(List::Jobs, &PageRequest::first(3)).unwrap();
        assert_eq!(close(List::Jobs, &at, vec![3, 2, 1], |id| *id).unwrap().next_token, "");
    }

    #[test]
    fn sizes_default_and_are_capped() {
        assert_eq!(open::<i64>(List::Jobs, &PageRequest::first(0)).unwrap().size, DEFAULT_PAGE_SIZE);
        assert_eq!(open::<i64>(List::Jobs, &PageRequest::first(MAX_PAGE_SIZE)).unwrap().size, MAX_PAGE_SIZE);
        let e = open::<i64>(List::Jobs, &PageRequest::first(MAX_PAGE_SIZE + 1)).unwrap_err();
        assert!(matches!(e, StoreError::Invalid { what: "page size", .. }), "{e}");
    }

    #[test]
    fn garbled_tokens_are_refused() {
        let wrong_key = URL_SAFE_NO_PAD.encode(br#"{"list":"jobs","after":"x"}"#);
        for token in ["%%%", "bm90IGpzb24", &wrong_key, &"A".repeat(MAX_TOKEN_LEN + 1)] {
            let e = open::<i64>(List::Jobs, &PageRequest::after(1, token)).unwrap_err();
            assert!(matches!(e, StoreError::Invalid { what: "page token", .. }), "{token}: {e}");
        }
    }
}
