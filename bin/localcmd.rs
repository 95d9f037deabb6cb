//! `pslab local` and `pslab lr` as the user sees them: run a local cluster
//! ([`crate::local::run`]) and turn its events into a progress bar, per-epoch
//! and per-sweep lines, the objective curve's PNG, the result table, the
//! failover summary and the closing line.

use crate::{local, plot};

pub(crate) fn run_local(spec: local::ClusterSpec, verbose: bool, png: Option<String>) -> Result<(), String> {
    let (servers, shards, workers, app) = (spec.servers, spec.shards, spec.workers, spec.app.clone());
    ps_apps::job_spec(&app, &spec.params, servers, spec.copies).map_err(|e| e.to_string())?; // fail fast on bad parameters
    let copies = spec.copies.min(servers);
    eprintln!(
        "pslab local: manager + {servers} server(s) x {shards} shard(s) + {workers} worker(s) on 127.0.0.1, app {app}{}",
        if copies > 1 { format!(", {copies} copies of every shard") } else { String::new() }
    );
    let mut failovers: Vec<serde_json::Value> = Vec::new();
    let mut kills: Vec<serde_json::Value> = Vec::new();
    let mut last_kill: Option<std::time::Instant> = None;
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:40.cyan/blue} {pos}/{len} {msg}")
            .expect("template")
            .progress_chars("=> "),
    );
    let mut progress: std::collections::BTreeMap<u64, (u64, u64)> = Default::default();
    let mut result: Option<serde_json::Value> = None;
    let mut curve: Vec<(f64, f64)> = Vec::new();
    let started = std::time::Instant::now();
    let outcome = local::run(&spec, &mut |e| match e {
        local::Event::At { kind, value, .. } if kind == "progress" => {
            let rank = value["rank"].as_u64().unwrap_or(0);
            progress.insert(rank, (value["done"].as_u64().unwrap_or(0), value["total"].as_u64().unwrap_or(0)));
            let (done, total) = progress.values().fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
            bar.set_length(total);
            bar.set_position(done);
            bar.set_message(value["unit"].as_str().unwrap_or("").to_string());
        }
        local::Event::At { kind, value, .. } if kind == "epoch" => bar.suspend(|| {
            println!(
                "epoch {}/{}  train loss {:.5}  ({} examples, {:.1} s)",
                value["epoch"],
                value["epochs"],
                value["loss"].as_f64().unwrap_or(f64::NAN),
                value["examples"],
                value["secs"].as_f64().unwrap_or(0.0)
            )
        }),
        local::Event::At { kind, value, .. } if kind == "iter" => bar.suspend(|| {
            let objective = value["objective"].as_f64().unwrap_or(f64::NAN);
            curve.push((value["sweep"].as_f64().unwrap_or(0.0), objective));
            println!(
                "sweep {}/{}  objective {objective:.4}  non-zeros {}  filtered {:.1}%  sent {} B  ({:.1} s)",
                value["sweep"],
                value["sweeps"],
                value["nonzeros"],
                value["filtered_pct"].as_f64().unwrap_or(0.0),
                value["bytes"],
                value["secs"].as_f64().unwrap_or(0.0)
            )
        }),
        local::Event::At { kind, value, .. } if kind == "result" => result = Some(value),
        local::Event::At { kind, mut value, .. } if kind == "failover" => {
            // the launcher's own measure: from its kill to the line of the first answer
            if let Some(k) = last_kill {
                value["since_kill_ms"] = (k.elapsed().as_secs_f64() * 1e3).into();
            }
            failovers.push(value)
        }
        local::Event::At { kind, value, .. } if kind == "leader" => {
            let line = format!(
                "manager failover: {} leads, {:.0} ms after the kill of the leader",
                value["name"].as_str().unwrap_or("?"),
                value["since_kill_ms"].as_f64().unwrap_or(0.0)
            );
            bar.suspend(|| println!("{line}"));
        }
        local::Event::At { kind, value, .. } if kind == "killed" => {
            bar.suspend(|| {
                eprintln!(
                    "[launcher] killed {} (pid {}) with SIGKILL {:.2} s into the job",
                    value["name"].as_str().unwrap_or("?"),
                    value["pid"],
                    value["at_s"].as_f64().unwrap_or(0.0)
                )
            });
            last_kill = Some(std::time::Instant::now());
            kills.push(value)
        }
        local::Event::At { kind, value, role } => bar.suspend(|| println!("[{role}] {kind}: {value}")),
        local::Event::Line { role, line } => {
            if verbose
                || line.contains("ERROR")
                || line.contains("WARN")
                || line.contains("finished")
                || line.contains("failed")
                || line.starts_with("error:")
            {
                bar.suspend(|| eprintln!("[{role}] {line}"));
            }
        }
    });
    bar.finish_and_clear();
    if let (Some(path), false) = (&png, curve.is_empty()) {
        let figure = plot::Figure {
            title: format!("{app}: objective per sweep"),
            panels: vec![plot::Panel {
                title: "training objective".into(),
                x: "sweep".into(),
                y: "objective".into(),
                log_y: false,
                y_fit: true,
                kind: plot::Kind::Line,
                series: vec![plot::Series { name: app.clone(), points: curve }],
            }],
        };
        plot::figure_png(path, &figure)?;
        eprintln!("pslab local: objective curve in {path}");
    }
    if let Some(r) = result.as_ref().filter(|r| r.get("planted_accuracy").is_none()) {
        println!("----------------------------------------------------------------");
        for (k, v) in r.as_object().into_iter().flatten() {
            println!("{k:<22} {v}");
        }
        println!("----------------------------------------------------------------");
    } else if let Some(r) = &result {
        println!("----------------------------------------------------------------");
        println!("held-out examples      {}", r["test_examples"]);
        println!("test accuracy          {:.4}", r["accuracy"].as_f64().unwrap_or(0.0));
        println!(
            "planted model accuracy {:.4}   (the best a learner can expect: label noise)",
            r["planted_accuracy"].as_f64().unwrap_or(0.0)
        );
        println!("agreement with planted {:.4}", r["agreement_with_planted"].as_f64().unwrap_or(0.0));
        println!("test log-loss          {:.4}", r["test_logloss"].as_f64().unwrap_or(0.0));
        println!("test AUC               {:.4}", r["auc"].as_f64().unwrap_or(0.0));
        for l in r["lost_workers"].as_array().into_iter().flatten() {
            let done = if l["policy"] == "reassign" { "dealt out to the live workers" } else { "left out" };
            println!(
                "lost worker            {}: its {} examples {done} from epoch {} on",
                l["worker"], l["examples"], l["from_epoch"]
            );
        }
        println!("----------------------------------------------------------------");
    }
    if !failovers.is_empty() {
        let ms: Vec<f64> = failovers.iter().filter_map(|f| f["ms"].as_f64()).collect();
        let longest = ms.iter().copied().fold(0.0, f64::max);
        let since_kill = failovers.iter().filter_map(|f| f["since_kill_ms"].as_f64()).fold(0.0, f64::max);
        println!(
            "failover: {} connections moved to new heads; from a lost connection to the new head's first answer: \
             longest {longest:.0} ms, mean {:.0} ms (workers' clocks); from the kill to the last of those answers: \
             {since_kill:.0} ms (the launcher's)",
            ms.len(),
            ms.iter().sum::<f64>() / ms.len().max(1) as f64
        );
    }
    match outcome {
        Ok(()) if !kills.is_empty() => {
            eprintln!(
                "pslab local: the job completed after {:.1} s, with {} killed on purpose; every other process exited cleanly",
                started.elapsed().as_secs_f64(),
                kills.iter().filter_map(|k| k["name"].as_str()).collect::<Vec<_>>().join(", ")
            );
            Ok(())
        }
        Ok(()) => {
            eprintln!("pslab local: every process exited cleanly after {:.1} s", started.elapsed().as_secs_f64());
            Ok(())
        }
        Err(e) => Err(e),
    }
}
