"""Every task graph `gendag run` knows, by name."""

from flows.flow_matching import flow_matching

GRAPH_FLOWS = {"flow-matching": flow_matching}
