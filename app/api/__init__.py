"""HTTP only: controllers, request/response structs, auth, errors."""
