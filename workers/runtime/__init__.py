"""The worker runtime: MDP/0.1 worker side, heartbeats, the handler thread, the job context, process start-up."""
