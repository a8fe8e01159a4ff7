//! The REST API's handlers, one module per kind of resource, and what they
//! share: the default exchange's path name, list pagination and filtering,
//! query flags.
//!
//! Paths follow RabbitMQ's management API: vhosts are percent-encoded path
//! segments (`%2F` is `/`), and the default exchange, whose name is empty,
//! is addressed as `amq.default`.

mod bindings;
mod connections;
mod dead_letters;
mod events;
mod exchanges;
mod messages;
mod overview;
mod queues;
mod streams;
mod super_streams;
mod traces;
mod users;
mod vhosts;

use std::collections::HashMap;

use serde_json::{json, Value};

pub(crate) use bindings::{
    bind_exchange, bind_queue, exchange_destination_bindings, exchange_source_bindings,
    get_exchange_binding, get_queue_binding, list_all_bindings, list_bindings,
    list_exchange_bindings, list_queue_bindings, queue_bindings, unbind_exchange, unbind_queue,
};
pub(crate) use connections::{
    close_connection, get_connection, list_all_consumers, list_channels, list_connections,
    list_consumers,
};
pub(crate) use dead_letters::{
    get_redrive, list_dlqs, list_redrives, peek_messages, start_redrive, vhost_dlqs,
};
pub(crate) use events::events;
pub(crate) use exchanges::{
    delete_exchange, get_exchange, list_all_exchanges, list_exchanges, put_exchange,
};
pub(crate) use messages::{get_messages, publish};
pub(crate) use overview::{overview, rates};
pub(crate) use queues::{
    delete_queue, get_queue, list_all_queues, list_queues, purge_queue, put_queue,
};
pub(crate) use streams::stream_offsets;
pub(crate) use super_streams::super_stream_partitions;
pub(crate) use traces::{get_trace, get_trace_settings, put_trace_settings};
pub(crate) use users::{
    delete_permission, delete_user, get_permission, get_user, list_permissions, list_users,
    put_permission, put_user, user_permissions, vhost_permissions, whoami,
};
pub(crate) use vhosts::{delete_vhost, get_vhost, list_vhosts, put_vhost};

use crate::error::ApiError;

/// The result of a handler.
pub(crate) type ApiResult<T> = Result<T, ApiError>;

/// The name the default exchange (named "") goes by in paths.
const DEFAULT_EXCHANGE_PATH: &str = "amq.default";

/// The exchange a path segment names: `amq.default` is the default exchange.
pub(crate) fn exchange_from_path(name: &str) -> &str {
    if name == DEFAULT_EXCHANGE_PATH {
        ""
    } else {
        name
    }
}

/// The largest page a list returns, as RabbitMQ's.
const MAX_PAGE_SIZE: usize = 500;
/// The largest page number accepted (documented in the OpenAPI document).
const MAX_PAGE: usize = 1_000_000_000;
const DEFAULT_PAGE_SIZE: usize = 100;

/// What a list request asks for: `name` keeps items whose name contains it;
/// `page` (from 1) and `page_size` ask for one page of the result.
#[derive(Debug, Default)]
struct ListQuery {
    name: Option<String>,
    page: Option<usize>,
    page_size: usize,
}

fn positive(query: &HashMap<String, String>, key: &str) -> ApiResult<Option<usize>> {
    match query.get(key) {
        None => Ok(None),
        Some(v) => match v.parse::<usize>() {
            Ok(n) if n >= 1 => Ok(Some(n)),
            _ => Err(ApiError::bad_request(format!(
                "query parameter {key} must be a positive integer, not {v:?}"
            ))),
        },
    }
}

impl ListQuery {
    fn parse(query: &HashMap<String, String>) -> ApiResult<ListQuery> {
        let page_size = positive(query, "page_size")?.unwrap_or(DEFAULT_PAGE_SIZE);
        if page_size > MAX_PAGE_SIZE {
            return Err(ApiError::bad_request(format!(
                "page_size {page_size} is larger than the maximum, {MAX_PAGE_SIZE}"
            )));
        }
        Ok(ListQuery {
            name: query.get("name").filter(|n| !n.is_empty()).cloned(),
            page: match positive(query, "page")? {
                Some(page) if page > MAX_PAGE => {
                    return Err(ApiError::bad_request(format!(
                        "page {page} is larger than the maximum, {MAX_PAGE}"
                    )))
                }
                page => page,
            },
            page_size,
        })
    }
}

/// Filters `items` (JSON objects with a `name`) and, when a page was asked
/// for, cuts that page out and wraps it with the counts RabbitMQ reports;
/// otherwise answers the filtered array. A page past the end is empty (the
/// list may have shrunk since the client counted its pages).
fn listing(items: Vec<Value>, query: &HashMap<String, String>) -> ApiResult<Value> {
    let q = ListQuery::parse(query)?;
    let total = items.len();
    let filtered: Vec<Value> = match &q.name {
        Some(part) => items
            .into_iter()
            .filter(|item| {
                item.get("name")
                    .and_then(Value::as_str)
                    .is_some_and(|n| n.contains(part.as_str()))
            })
            .collect(),
        None => items,
    };
    let Some(page) = q.page else {
        return Ok(Value::Array(filtered));
    };
    let filtered_count = filtered.len();
    let page_count = filtered_count.div_ceil(q.page_size).max(1);
    let page_items: Vec<Value> = filtered
        .into_iter()
        .skip((page - 1).saturating_mul(q.page_size))
        .take(q.page_size)
        .collect();
    Ok(json!({
        "items": page_items,
        "item_count": page_items.len(),
        "filtered_count": filtered_count,
        "total_count": total,
        "page": page,
        "page_size": q.page_size,
        "page_count": page_count,
    }))
}

/// A boolean query flag such as `if-unused=true`; absent means false.
fn flag(query: &HashMap<String, String>, key: &str) -> ApiResult<bool> {
    match query.get(key).map(String::as_str) {
        None | Some("false") => Ok(false),
        Some("true") | Some("") => Ok(true),
        Some(other) => Err(ApiError::bad_request(format!(
            "query parameter {key} must be true or false, not {other:?}"
        ))),
    }
}

/// The answer for a path that no route matches.
pub(crate) async fn no_route(uri: axum::http::Uri) -> ApiError {
    ApiError::not_found(format!("no resource at {}", uri.path()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn items(n: usize) -> Vec<Value> {
        (0..n).map(|i| json!({"name": format!("q{i}")})).collect()
    }

    fn query(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn pages_cover_the_filtered_list_once() {
        let all = items(25);
        let mut seen = Vec::new();
        for page in 1..=3 {
            let p = page.to_string();
            let v = listing(all.clone(), &query(&[("page", &p), ("page_size", "10")])).unwrap();
            assert_eq!(v["page_count"], 3);
            assert_eq!(v["total_count"], 25);
            for item in v["items"].as_array().unwrap() {
                seen.push(item["name"].as_str().unwrap().to_string());
            }
        }
        assert_eq!(seen.len(), 25);
        let past = listing(all.clone(), &query(&[("page", "4"), ("page_size", "10")])).unwrap();
        assert_eq!(past["items"], json!([]));
        assert_eq!(past["filtered_count"], 25);
        assert!(listing(all.clone(), &query(&[("page", "0")])).is_err());
        assert!(listing(all.clone(), &query(&[("page_size", "501")])).is_err());
        let filtered = listing(all, &query(&[("name", "q1")])).unwrap();
        // q1 and q10..q19
        assert_eq!(filtered.as_array().unwrap().len(), 11);
    }

    proptest::proptest! {
        /// Against the plain model (filter, then cut into pages): every
        /// page together is the filtered list, in order, once; the counts
        /// agree; pages past the end are empty.
        #[test]
        fn pages_partition_the_filtered_list(
            names in proptest::collection::vec("[ab]{0,3}", 0..40),
            filter in proptest::option::of("[ab]{0,2}"),
            page_size in 1usize..12,
        ) {
            let items: Vec<Value> = names.iter().map(|n| json!({"name": n})).collect();
            let model: Vec<&String> = names
                .iter()
                .filter(|n| filter.as_deref().is_none_or(|f| f.is_empty() || n.contains(f)))
                .collect();
            let mut pairs = vec![("page_size".to_string(), page_size.to_string())];
            if let Some(f) = &filter {
                pairs.push(("name".to_string(), f.clone()));
            }
            let mut seen = Vec::new();
            let pages = model.len().div_ceil(page_size).max(1);
            for page in 1..=pages + 1 {
                let mut q: HashMap<String, String> = pairs.iter().cloned().collect();
                q.insert("page".into(), page.to_string());
                let v = listing(items.clone(), &q).unwrap();
                proptest::prop_assert_eq!(v["page_count"].as_u64(), Some(pages as u64));
                proptest::prop_assert_eq!(v["filtered_count"].as_u64(), Some(model.len() as u64));
                proptest::prop_assert_eq!(v["total_count"].as_u64(), Some(names.len() as u64));
                let got = v["items"].as_array().unwrap();
                proptest::prop_assert!(got.len() <= page_size);
                proptest::prop_assert_eq!(v["item_count"].as_u64(), Some(got.len() as u64));
                if page > pages {
                    proptest::prop_assert!(got.is_empty());
                }
                seen.extend(got.iter().map(|i| i["name"].as_str().unwrap().to_string()));
            }
            let want: Vec<String> = model.into_iter().cloned().collect();
            proptest::prop_assert_eq!(seen, want);
        }
    }

    #[test]
    fn flags_parse() {
        assert!(!flag(&query(&[]), "if-unused").unwrap());
        assert!(flag(&query(&[("if-unused", "true")]), "if-unused").unwrap());
        assert!(flag(&query(&[("if-unused", "yes")]), "if-unused").is_err());
    }
}
