"""agentmesh.container"""
