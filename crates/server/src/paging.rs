//! Page requests from the list calls' fields (see `drover_store::pages` for what a page is).

use drover_store::{MAX_PAGE_SIZE, PageRequest};

/// The page a request asks for: `page_size` items after `page_token`.
pub(crate) fn page(page_size: u32, page_token: String) -> PageRequest {
    PageRequest { size: page_size, token: page_token }
}

/// [`page`] for calls that took a `limit` before they took pages: a client that predates
/// `page_size` sends only `limit`, which then sets the size, lowered to the cap rather than
/// refused (such clients asked for up to 10,000 and must still get an answer).
pub(crate) fn page_or_limit(page_size: u32, limit: u32, page_token: String) -> PageRequest {
    let size = if page_size == 0 { limit.min(MAX_PAGE_SIZE) } else { page_size };
    PageRequest { size, token: page_token }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_old_limit_sets_the_size_within_the_cap() {
        assert_eq!(page_or_limit(0, 0, String::new()).size, 0, "the store's default");
        assert_eq!(page_or_limit(0, 20, String::new()).size, 20);
        assert_eq!(page_or_limit(0, 10_000, String::new()).size, MAX_PAGE_SIZE);
        assert_eq!(page_or_limit(7, 10_000, String::new()).size, 7, "page_size wins");
        assert_eq!(
            page_or_limit(MAX_PAGE_SIZE + 1, 0, String::new()).size,
            MAX_PAGE_SIZE + 1,
            "refused later"
        );
    }
}
