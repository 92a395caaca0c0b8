"""Training: one loop (loop.py) under every method, each a loss and a batch source.

    state.py     the train state and one gradient update with accumulation (shared by all)
    loop.py      the loop: resume, progress, finite checks, checkpoints, evaluation, best model, epochs
    rundir.py    the out_dir: lock, checkpoints that never mix runs, the best model
    progress.py  progress lines, metrics.jsonl, TensorBoard
    models.py    loading models on the mesh, students made of teacher layers, the forward pass
    distill.py   token-level KD and SFT on data rows
    gkd.py       on-policy KD: KD's loss on batches the student samples (a share lmbda)
    minillm.py   MiniLLM: sequence-level reverse KL by policy gradient on teacher-mixed samples
    grpo.py      GRPO on code problems with tests
    rewards.py   GRPO's rewards and group advantages
    rollout.py   prompts -> sampled completions -> training rows (MiniLLM, GRPO, GKD)
    run.py       a command from config to report
"""
