package services

import "go.uber.org/zap"

// LoggerOr returns l, or a logger that discards everything when l is nil:
// every Config takes an optional *zap.Logger, and this is the one nil check.
func LoggerOr(l *zap.Logger) *zap.Logger {
	if l == nil {
		return zap.NewNop()
	}
	return l
}
