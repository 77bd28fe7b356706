"""`chiar reproduce`: the paper's claims E1-E8 as an experiment matrix per scale (matrix), its
plan and resumable runner with one small record per finished run (run), and the aggregation of
those records into docs/claims.md with verdicts and figures (report)."""
