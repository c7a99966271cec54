"""Run machinery: checkpoints, exact resume, atomic writes; every private Lightning / torch use lives here."""
