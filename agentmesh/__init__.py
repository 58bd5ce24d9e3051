"""agentmesh: peer-to-peer multi-agent synthetic data generation.

Each task travels as an Orchestrator protobuf from agent to agent over gRPC; agents are stateless
replicas hosted in Ray actors; discovery (etcd or Consul) says who is where.
"""

from __future__ import annotations

__version__ = "0.1.0"
