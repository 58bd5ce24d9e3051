"""agentmesh.agent"""
