//! The operator subcommands: they call the broker's admin API on its HTTP
//! port and print human tables, or the API's JSON with `--json`.

use anyhow::{Context, bail};
use comfy_table::{Table, presets::UTF8_BORDERS_ONLY};
use serde_json::Value;

/// Where the admin API is and how to authenticate to it.
#[derive(Debug, Clone)]
pub struct AdminApi {
    /// `host:port` of the broker's HTTP port.
    pub http: String,
    /// The admin bearer token.
    pub token: Option<String>,
}

impl AdminApi {
    /// Calls `method path` with an optional JSON body; returns the JSON
    /// answer, or the API's error as an error.
    pub async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<Value> {
        let url = format!("http://{}{path}", self.http);
        let token = self
            .token
            .clone()
            .context("the admin API needs --admin-token (or VOLNA_ADMIN_TOKEN)")?;
        let method = method.to_owned();
        tokio::task::spawn_blocking(move || {
            let agent: ureq::Agent = ureq::Agent::config_builder()
                .http_status_as_error(false)
                .build()
                .into();
            let auth = format!("Bearer {token}");
            let response = match method.as_str() {
                "GET" => agent.get(&url).header("Authorization", &auth).call(),
                "DELETE" => agent.delete(&url).header("Authorization", &auth).call(),
                "PUT" => agent
                    .put(&url)
                    .header("Authorization", &auth)
                    .send_json(body.unwrap_or(Value::Null)),
                _ => agent
                    .post(&url)
                    .header("Authorization", &auth)
                    .send_json(body.unwrap_or(Value::Null)),
            }
            .with_context(|| format!("calling {url}"))?;
            let status = response.status();
            let text = response
                .into_body()
                .read_to_string()
                .context("reading the answer")?;
            let value: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
            if !status.is_success() {
                let message = value["error"]
                    .as_str()
                    .map_or_else(|| value.to_string(), str::to_owned);
                bail!("admin API answered {}: {message}", status.as_u16());
            }
            Ok(value)
        })
        .await
        .context("admin call")?
    }
}

/// Prints `value` as JSON or as a table with `columns` (JSON keys).
pub fn print(value: &Value, columns: &[&str], json: bool) {
    if json {
        println!("{value}");
        return;
    }
    let rows: Vec<&Value> = match value {
        Value::Array(items) => items.iter().collect(),
        other => vec![other],
    };
    let mut table = Table::new();
    table
        .load_preset(UTF8_BORDERS_ONLY)
        .set_header(columns.iter().copied());
    for row in rows {
        table.add_row(columns.iter().map(|c| match &row[*c] {
            Value::String(s) => s.clone(),
            Value::Null => "-".to_owned(),
            other => other.to_string(),
        }));
    }
    println!("{table}");
}
