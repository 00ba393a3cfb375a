"""Cortex load tests: ``python -m cortex.loadtest --help``.

Drives a real suite through the public client only (agents = threads with their own
`Client`; with many agents they are spread over a few processes: on 2 cores, 100 agents in
2 processes gave 720 no-op tasks/s against 440 in one and 673 in four). See __main__.py.

report.json keys (schema "cortex.loadtest/1"; every figure is the median over --runs):

- ``schema``, ``created`` (unix time), ``host`` {cpus, memory_mb, python, platform},
  ``config`` (the command-line options), ``runs``, ``notes``, ``leftovers`` (per run: pids
  of the suite still alive after stop; must be empty), ``per_run`` (each run in full);
- ``dashboard_page`` (with --dashboard-page: the page kept open during every scenario)
  {page, browser_cpu_s, event_to_screen_s, event_to_page_s}, else null;
- ``idle_cpu`` {before, after}: {seconds, cpu_s, fraction_of_core, by_role} of the suite
  over a quiet period before and after the load, and {models_s, models_busy}: the probe
  after the load first waits (60 s at most) for a model training the load made due,
  which starts in the lull after it, to end; how long, and whether one still ran;
- ``targets``: [{scenario, metric, what, op, target, unit, value, met, peers}] against
  docs/targets.md;
- ``scenarios.<name>`` (latency, rate, noop, onetype, utilization, priority, mixed, chaos):
  ``agents``, ``agent_processes``, ``workers``, ``wall_s`` (first submit to last result),
  ``throughput`` (completed / wall_s), ``completion_rate`` (completed / planned),
  ``tasks`` {planned, submitted, accepted, rejected, completed, failed, dead, cancelled,
  lost (accepted, never final), duplicated (task.completed twice in the JSONL), retried,
  seen_late}, ``latency_ms``.{submit (call -> ack), coordination (submit -> handler
  start, first attempts), coordination_idle (the same for tasks dispatched in the turn
  that created them, i.e. that found an idle worker), queue_wait (created -> dispatched),
  end_to_end (submit -> result seen by the agent)} each {count, mean, p50, p95, p99, max},
  ``utilization`` {overall (handler time / workers x span of handler activity), steady
  (middle 80 % of that span), busy_s}, ``failures`` {category: n}, ``rejections``
  {code: n}, ``zombies`` (lasting, after a 2 s grace) and ``zombies_transient``,
  ``tokens`` {reported (sum of tokens_used), ledger_committed (delta), error_pct,
  over_allocated_samples}, ``events`` {received, written (router counters, delta),
  jsonl_lines, missing, gaps, duplicates, per_s, settled}, ``waiting`` {tasks (that
  waited for cpu, memory or tokens), by_reason {reason: {events, tasks}}},
  ``resources`` {cpu_s by role,
  peak_rss_mb by service, workers_peak_rss_mb, suite_peak_rss_mb (sum of RSS),
  memory_at_end {rss_mb, pss_mb}, harness_cpu_s, cpu_ms_per_task {role: ms of CPU per
  completed task, agents (the harness and its agent processes), suite (the suite's
  processes but model training)}}, ``lost_ids``, ``duplicated_ids``;
  plus ``rate`` {offered, achieved_submit_rate, submit_lag_ms}, ``priority``
  {critical_wait_ms, low_wait_ms, flood_queued_at_critical_submit, ...}, ``noop_phase``
  (onetype: the no-ops after the sleeps, {tasks, completed, throughput, coordination_ms}),
  ``mixed`` (per
  type), ``chaos`` {kills, by_role, base, interval_s}, ``dashboard``
  (the dashboard scenario: noop without, then with a headless page open:
  {throughput_without_page, throughput_with_page, dashboard_cpu_s_without_page,
  dashboard_cpu_s_with_page, wall_s_without_page, wall_s_with_page, page, browser_cpu_s,
  event_to_screen_s, event_to_page_s}; the dashboard's own CPU is
  ``resources.cpu_s.dashboard``); the mixed scenario also has
  ``phases`` {training, measurement (task counts), scale (--mixed-scale)},
  ``model_training`` {loaded, samples, trained_at, previous_trained_at, wait_s,
  train_calls, held_out_within_25pct (the model's own held-out figures), reason (when
  not loaded)}, ``prediction`` {sources {source: completed tasks}, duration_within_25pct,
  tokens_within_25pct, model_predicted} over the measurement phase (tasks submitted after
  the retrained model was loaded) and ``prediction_training_phase`` (the same over the
  training phase);
- ``scenarios.sweep``: ``points`` [{agents, agent_processes, tasks, throughput,
  coordination_ms, end_to_end_ms, submit_ms, lost, duplicated, zombies, cpu_s,
  harness_cpu_s}], ``tasks`` (totals), ``zombies``.
"""
