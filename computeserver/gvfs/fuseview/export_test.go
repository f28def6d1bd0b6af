package fuseview

// Test hooks for the external tests of this package.

var (
	ClearDeadMount = clearDeadMount
	FusectlMounted = fusectlMounted
)

// ConnectionsDir is where fusectl is mounted.
const ConnectionsDir = connectionsDir
