"""The benchmark harness of hf_adahessian, run from the repository root as a package:

    python -m benchmarks.sst2 [--quick] [--seeds 42,43,44] [--eval_every K] [--lr_grid]
    python -m benchmarks.multi30k [--quick] ...
    python -m benchmarks.lm [--quick] ...
    python -m benchmarks.profile_hessian_step [--quick] [--estimators exact,finite_difference]
    python -m benchmarks.memory_hessian_step [--quick] [--estimators exact,finite_difference]

The five entry points, then one module per job:

    paths      where things are read and written; records made portable (repository-relative)
    machine    the machine, the library versions, the git commit; the children's environment
    options    command-line options, budgets, seeds, the output folder
    specs      typed specs: OptimizerSpec, Metric, Budget(s), Experiment; building a loop optimizer
    data       the shared data, and quick mode's slices of it
    model_folder the from-scratch benchmarks' model folder, built by the package's own command
    runs       one child process per (optimizer, lr, seed) and its command line
    comparison the parent's side of a comparison or a learning-rate search
    stats      step-time statistics, mean ± sd over seeds, ratios, the noise rule, time to quality
    report     tables, JSON, plots
    recorder   what a child measures (the Recorder)
    runner     the instrumented child: the unmodified script, its Trainer subclassed
    plain_loop the peers' training loop
    steps      one step of each kind, phase by phase, from the package's own pieces
    minilm     the step profiles' model and batch

See BENCHMARKS.md for what is measured and the results layout.
"""
