"""The wire and its clients: MDP/0.1 constants, msgpack codec, typed messages, the client core with its blocking and asyncio faces, the jobs and artifacts clients, the worker's artifact cache."""
