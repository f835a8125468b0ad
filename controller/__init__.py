"""The controller: the gRPC API users talk to. Deploys SUT and LoadGen agents through a backend
(local processes by default), runs LoadGen tests through persistent sessions, tracks runs in a
sqlite registry and writes results through the store."""
