"""Tools a model may call during an episode: the calculator, the sandboxed Python interpreter
and MCP servers, behind one interface (`rollout.tools.base.Tool`)."""
