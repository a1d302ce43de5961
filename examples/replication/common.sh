# Sourced by the replication scripts, from the repository root: one thread per rank, the run record, pruning.
export OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false PYTHONWARNINGS=ignore::FutureWarning

record_environment() {  # FILE: the commit (and whether the tree had local changes), the date, CPU and load, appended
  mkdir -p "$(dirname "$1")"
  { echo "commit $(git rev-parse HEAD)$(git diff --quiet HEAD || echo ' (with local changes)')"; date -u
    echo "$(nproc --all) cores: $(lscpu | sed -n 's/^Model name: *//p')"; uptime; } >> "$1"
}

prune() {  # DIR: the runs' merged models under DIR (their scores are in eval.jsonl already); KEEP_FINAL=1 keeps them
  [ "${KEEP_FINAL:-0}" = 1 ] || find "$1" \( -path '*/runs/*/final' -o -path '*/runs/*/final_peft' \) -type d -prune \
    -exec rm -rf {} +
}
