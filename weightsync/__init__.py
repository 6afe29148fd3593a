"""Weight sync, one module per role: `transport` (bucket plan, wire format, the gloo/NCCL group),
`sender` (the learner's rank 0 broadcasts), `receiver` (the vLLM worker side). Who joins and when
is the orchestration's: `vespo.orchestration.weight_publisher`."""
