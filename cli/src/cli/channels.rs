//! `dormouse channels`: every channel with a log, page by page through `GET /v1/channels`
//! (needs the admin capability when auth is on), or one channel through
//! `GET /v1/channels/{c}`.

use serde_json::Value;

use super::client::{ConnArgs, client};
use super::output;

#[derive(Debug, clap::Args)]
pub(crate) struct ChannelsArgs {
    #[command(flatten)]
    conn: ConnArgs,
    /// Describe only this channel (needs subscribe or history on it, not admin).
    channel: Option<String>,
    /// One JSON object per channel per line, as the server answers them.
    #[arg(long)]
    json: bool,
}

/// The largest page the list route serves.
const PAGE: &str = "1000";

pub(crate) async fn run(args: ChannelsArgs) -> anyhow::Result<()> {
    let client = client(&args.conn)?;
    if let Some(channel) = &args.channel {
        let info = client
            .get_json(client.url(&["v1", "channels", channel]))
            .await?;
        return if args.json {
            output::line(&info.to_string())
        } else {
            describe(&info)
        };
    }
    let mut rows = Vec::new();
    let mut after: Option<String> = None;
    let (active, hibernated) = loop {
        let mut url = client.url(&["v1", "channels"]);
        url.query_pairs_mut().append_pair("limit", PAGE);
        if let Some(after) = &after {
            url.query_pairs_mut().append_pair("after", after);
        }
        let page = client.get_json(url).await?;
        let channels = page["channels"].as_array().cloned().unwrap_or_default();
        if args.json {
            for channel in &channels {
                output::line(&channel.to_string())?;
            }
        } else {
            rows.extend(channels);
        }
        match page["next_after"].as_str() {
            Some(next) => after = Some(next.to_string()),
            None => break (page["active"].clone(), page["hibernated"].clone()),
        }
    };
    if args.json {
        return Ok(());
    }
    print_table(&rows)?;
    output::line(&format!(
        "{} channels with events; in memory: {active}, hibernated: {hibernated}",
        rows.len()
    ))
}

/// A JSON value as a table cell: strings bare, null as `-`.
fn cell(value: &Value) -> String {
    match value {
        Value::Null => "-".to_string(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn print_table(rows: &[Value]) -> anyhow::Result<()> {
    const COLUMNS: [(&str, &str); 4] = [
        ("CHANNEL", "channel"),
        ("STATE", "state"),
        ("EVENTS", "events"),
        ("LAST ID", "last_id"),
    ];
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|row| COLUMNS.iter().map(|(_, key)| cell(&row[*key])).collect())
        .collect();
    let widths: Vec<usize> = COLUMNS
        .iter()
        .enumerate()
        .map(|(i, (title, _))| {
            cells
                .iter()
                .map(|row| row[i].chars().count())
                .chain([title.len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |values: Vec<&str>| {
        let mut text = String::new();
        for (i, value) in values.iter().enumerate() {
            if i + 1 == values.len() {
                text.push_str(value);
            } else {
                text.push_str(&format!("{value:<width$}  ", width = widths[i]));
            }
        }
        text
    };
    let mut table = line(COLUMNS.iter().map(|(title, _)| *title).collect());
    table.push('\n');
    for row in &cells {
        table.push_str(&line(row.iter().map(String::as_str).collect()));
        table.push('\n');
    }
    output::write(table.as_bytes())
}

fn describe(info: &Value) -> anyhow::Result<()> {
    let mut text = String::new();
    for key in [
        "channel",
        "state",
        "events",
        "bytes",
        "subscribers",
        "earliest_id",
        "last_id",
    ] {
        text.push_str(&format!("{key:<12} {}\n", cell(&info[key])));
    }
    output::write(text.as_bytes())
}
