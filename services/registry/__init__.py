"""agentmesh.registry"""
