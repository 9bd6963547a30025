//! Reading a list from the server a page at a time.

use anyhow::Result;

/// Items the CLI asks for per page: the most a page holds, so a long list takes few calls.
const PAGE_SIZE: u32 = drover_store::MAX_PAGE_SIZE;

/// The items of a list, all of them or the first `limit` (`Some(0)` counts as no limit),
/// following page tokens. `fetch(page_size, page_token)` reads one page and returns its items
/// and the token of the next page (empty after the last).
pub async fn collect<T>(
    limit: Option<u32>,
    mut fetch: impl AsyncFnMut(u32, String) -> Result<(Vec<T>, String)>,
) -> Result<Vec<T>> {
    let limit = limit.filter(|l| *l > 0).map(|l| l as usize);
    let mut items = Vec::new();
    let mut token = String::new();
    loop {
        let left = limit.map_or(usize::MAX, |l| l.saturating_sub(items.len()));
        let size = u32::try_from(left).map_or(PAGE_SIZE, |left| left.min(PAGE_SIZE));
        let (page, next) = fetch(size, token).await?;
        items.extend(page);
        if let Some(limit) = limit {
            items.truncate(limit);
        }
        if next.is_empty() || limit.is_some_and(|l| items.len() >= l) {
            return Ok(items);
        }
        token = next;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A list of `n` numbers served `page` at a time, as a server would.
    async fn numbers(n: u32, limit: Option<u32>) -> (Vec<u32>, Vec<u32>) {
        let mut asked = Vec::new();
        let got = collect(limit, async |size, token: String| {
            asked.push(size);
            let from: u32 = if token.is_empty() { 0 } else { token.parse()? };
            let to = (from + size).min(n);
            let next = if to < n { to.to_string() } else { String::new() };
            Ok(((from..to).collect(), next))
        })
        .await
        .unwrap();
        (got, asked)
    }

    #[tokio::test]
    async fn follows_pages_to_the_end_or_the_limit() {
        let (all, asked) = numbers(2500, None).await;
        assert_eq!(all, (0..2500).collect::<Vec<_>>());
        assert_eq!(asked, [PAGE_SIZE; 3]);
        let (first, asked) = numbers(2500, Some(1200)).await;
        assert_eq!(first, (0..1200).collect::<Vec<_>>());
        assert_eq!(asked, [PAGE_SIZE, 200], "the last page asks only for what is missing");
        let (few, _) = numbers(3, Some(50)).await;
        assert_eq!(few, [0, 1, 2]);
        let (no_limit, _) = numbers(5, Some(0)).await;
        assert_eq!(no_limit.len(), 5);
    }
}
