"""Operations around the core: the launcher that starts one worker per GPU, metrics, logs, run reports,
the nightly schedule (beat) and the demo. Nothing here is on the tagging hot path."""
