package auth

import (
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"os"
	"strings"
	"time"

	imagev1 "github.com/vmgrid/vmgrid/proto/vmgrid/image/v1"
	"github.com/vmgrid/vmgrid/services/errdefs"
)

// taskPrefix starts every task credential, so they never collide with
// tokens-file tokens.
const taskPrefix = "vmgt1."

// TaskKey signs and checks task credentials. The shop, which decides which
// task runs for whom, holds it; so do the data servers, which check it.
type TaskKey []byte

// MinTaskKeyBytes is the shortest key accepted.
const MinTaskKeyBytes = 32

// LoadTaskKey reads a key file written by NewTaskKeyFile (hex, one line).
func LoadTaskKey(path string) (TaskKey, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("task key: %w", err)
	}
	k, err := hex.DecodeString(strings.TrimSpace(string(b)))
	if err != nil {
		return nil, fmt.Errorf("task key %s: not hex: %w", path, err)
	}
	if len(k) < MinTaskKeyBytes {
		return nil, fmt.Errorf("task key %s: %d bytes, want at least %d", path, len(k), MinTaskKeyBytes)
	}
	return k, nil
}

// NewTaskKeyFile writes a fresh random key to path (mode 0600).
func NewTaskKeyFile(path string) error {
	k := make([]byte, MinTaskKeyBytes)
	if _, err := rand.Read(k); err != nil {
		return err
	}
	return os.WriteFile(path, []byte(hex.EncodeToString(k)+"\n"), 0o600)
}

type taskClaims struct {
	Owner   string `json:"o"`
	Task    string `json:"t"`
	Expires int64  `json:"e"` // unix seconds
}

// MintTask returns a credential that acts for owner, scoped to task (a task
// id or a VM request id), valid for ttl.
func (k TaskKey) MintTask(owner, task string, ttl time.Duration) (string, error) {
	if len(k) < MinTaskKeyBytes {
		return "", fmt.Errorf("no task key configured: %w", errdefs.ErrFailedPrecondition)
	}
	if err := imagev1.ValidateName("owner", owner); err != nil {
		return "", err
	}
	if err := imagev1.ValidateName("task", task); err != nil {
		return "", err
	}
	body, err := json.Marshal(taskClaims{Owner: owner, Task: task, Expires: time.Now().Add(ttl).Unix()})
	if err != nil {
		return "", err
	}
	enc := base64.RawURLEncoding
	payload := enc.EncodeToString(body)
	return taskPrefix + payload + "." + enc.EncodeToString(k.sign(payload)), nil
}

func (k TaskKey) sign(payload string) []byte {
	m := hmac.New(sha256.New, k)
	m.Write([]byte(taskPrefix + payload))
	return m.Sum(nil)
}

// verify returns the caller a task credential stands for.
func (k TaskKey) verify(token string, now time.Time) (Caller, error) {
	rest, ok := strings.CutPrefix(token, taskPrefix)
	payload, mac, ok2 := strings.Cut(rest, ".")
	if !ok || !ok2 {
		return Caller{}, fmt.Errorf("malformed task credential: %w", errdefs.ErrUnauthenticated)
	}
	if len(k) < MinTaskKeyBytes {
		return Caller{}, fmt.Errorf("this server takes no task credentials (no --task-key): %w", errdefs.ErrUnauthenticated)
	}
	enc := base64.RawURLEncoding
	got, err := enc.DecodeString(mac)
	if err != nil || !hmac.Equal(got, k.sign(payload)) {
		return Caller{}, fmt.Errorf("task credential signature does not verify: %w", errdefs.ErrUnauthenticated)
	}
	body, err := enc.DecodeString(payload)
	var c taskClaims
	if err == nil {
		err = json.Unmarshal(body, &c)
	}
	if err != nil {
		return Caller{}, fmt.Errorf("malformed task credential: %w", errdefs.ErrUnauthenticated)
	}
	if now.Unix() >= c.Expires {
		return Caller{}, fmt.Errorf("task credential for %s expired at %s: %w", c.Task,
			time.Unix(c.Expires, 0).UTC().Format(time.RFC3339), errdefs.ErrUnauthenticated)
	}
	return Caller{Name: c.Owner, Role: RoleTask, Task: c.Task}, nil
}
