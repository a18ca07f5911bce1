"""Studies: grids of pretraining runs (shapes x schemes x learning rates x seeds) from a spec file,
run as `dslm pretrain` processes, resumable, summarised as tables, plots and decision rules."""
