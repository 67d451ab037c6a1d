"""The commented starter config that `loraflow init` writes."""

STARTER_CONFIG = """\
# loraflow pipeline config. Every key below is optional except data.source and data.format.
# Unknown keys are errors. Override any key on the command line: --set train.lr=1e-4
version: 1

model:
  name: smollm2-135m        # built-in alias, an HF model id, or a local folder
  task: causal_lm           # causal_lm | seq_cls (classification) | token_cls (named entities, slot spans)
  # dtype: auto             # frozen base weights: float32 | bfloat16 | float16 | auto (bf16 where native); unset: auto on GPU, float32 on CPU
  # pooling: mean           # seq_cls encoders: feed the head the mean of the token states (sentence encoders)

data:
  source: data/train.jsonl  # file, glob, folder, s3://..., or hf:<name>[:<config>][#<split>]; relative to this file
  format: instruction       # instruction | completion | chat | text | classification | token_classification
  fields:                   # your column names for the format's roles
    instruction: instruction
    input: input
    output: output
  max_seq_len: 512
  eval_fraction: 0.05       # held out by a hash of each example: stable as the data grows
  max_reject_fraction: 0.01 # fail if more rows than this are malformed (see rejects/)
  # token_classification: {text, entities: [{start, end, label}]}, {tokens, tags} or CoNLL files
  # tag_scheme: iob2        # iob2 | iob1 | bioes (converted to IOB2)
  # labels: [PER, LOC]      # optional: the entity types (or tag names, for class-id tags) allowed
  # label_all_tokens: false # label every sub-token of a word, not only its first

lora:
  r: 8
  alpha: 16
  dropout: 0.05
  target_modules: null      # null = the architecture's default; or a list, a regex, or all-linear

train:
  num_workers: 2            # Ray Train DDP workers
  use_gpu: false
  batch_size: 4             # per worker
  grad_accum: 1
  lr: 2.0e-4
  # head_lr: 1.0e-2         # lr of a classifier head trained in full (seq_cls, token_cls); default: lr
  epochs: 1
  log_every: 10
  checkpoint_every: 50

eval:
  actors: 1                 # Ray Data actor pool size
  generation:
    num_prompts: 0          # > 0: also generate answers for the first N eval rows and score exact match

registry:
  root: ~/.cache/loraflow/registry
  name: my-adapter
  gate:
    metric: loss
    direction: min
    min_delta: 0.0

# tune:                     # `loraflow tune`: a sweep, trials compared on a validation split
#   search: random          # random | grid | tpe (Optuna)
#   num_trials: 8
#   metric: loss            # any evaluate metric (accuracy, macro_f1, exact_match, ...), on validation
#   validation_fraction: 0.1  # of the train rows; the eval split scores the chosen trial once
#   search_space:
#     lora.r: {choice: [4, 8, 16, 32]}
#     lora.alpha_over_r: 2  # lora.alpha = 2 x lora.r
#     lora.target_modules: {choice: [attention, all-linear]}
#     train.lr: {loguniform: [1.0e-4, 1.0e-3]}
#   asha: true              # early stopping (needs train.eval_every)
#   grace_period: 1         # validations before a trial can be stopped
#   reduction_factor: 3

cluster:
  address: null             # null: local Ray; "auto" on a cluster node or inside a Ray Job
  work_dir: work            # stage outputs and checkpoints (relative to the working directory)
  runs_dir: runs            # run manifests and reports
"""
