"""The services the broker hosts itself, one module each: distill.jobs, distill.artifacts, distill.workers, distill.events. Policy only: no sockets, never the socket loop."""
