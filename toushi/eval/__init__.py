"""The eval stage and what it is made of: ``evaluate`` (the stage: students' answers, rule metrics, held-out NLL,
the summary), ``judge`` (the pairwise judge with its bias controls), ``simulate`` (the simulated seeker),
``strata`` (every number by each facet of the posts) and ``ladder`` (each rung compared with the one before)."""
