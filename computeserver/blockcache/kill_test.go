package blockcache

import (
	"bufio"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"github.com/vmgrid/vmgrid/services/errdefs"
)

// The kill test re-executes the test binary as a child that writes dirty
// blocks (fsync on, the default) and clean fills as fast as it can and
// reports each Write that returned; the parent SIGKILLs it mid-write,
// reopens the cache and checks that every reported write is there.
const (
	killDirEnv   = "BLOCKCACHE_KILL_DIR"
	killStartEnv = "BLOCKCACHE_KILL_START"
	killWriters  = 4
	killBlocks   = 16
)

func killConfig(dir string) Config { return smallConfig(dir) }

func killFile(g int) string { return fmt.Sprintf("disk%d", g) }

// TestKillChild is the child; it does nothing in a normal run.
func TestKillChild(t *testing.T) {
	dir := os.Getenv(killDirEnv)
	if dir == "" {
		t.Skip("the child process of TestKill9")
	}
	start, _ := strconv.ParseUint(os.Getenv(killStartEnv), 10, 64)
	c, err := Open(killConfig(dir))
	if err != nil {
		fmt.Printf("error %v\n", err)
		os.Exit(2)
	}
	for g := range killWriters {
		go func() {
			for v := start; ; v++ {
				for b := range uint64(killBlocks) {
					file := killFile(g)
					if err := c.Write(Key{File: file, Block: b}, blockData(file, b, v, c.bs)); err != nil {
						fmt.Printf("error %v\n", err)
						os.Exit(2)
					}
					// One write(2) per line: the line is in the pipe once
					// Write has returned, whatever happens next.
					fmt.Printf("ack %d %d %d\n", g, b, v)
				}
			}
		}()
	}
	go func() { // clean fills and evictions around the dirty blocks
		r := rand.New(rand.NewPCG(start, 0))
		for {
			k := Key{File: "golden", Block: uint64(r.IntN(512))}
			if err := c.Put(k, blockData(k.File, k.Block, 0, c.bs)); err != nil && !errors.Is(err, ErrSetFull) {
				fmt.Printf("error %v\n", err)
				os.Exit(2)
			}
		}
	}()
	fmt.Println("ready")
	select {}
}

func TestKill9(t *testing.T) {
	if testing.Short() {
		t.Skip("spawns processes")
	}
	dir := t.TempDir()
	type pos struct{ b, v uint64 }
	last := make([][]uint64, killWriters) // last acknowledged version per block
	for g := range last {
		last[g] = make([]uint64, killBlocks)
	}
	r := rand.New(rand.NewPCG(7, 7))
	for round := range 3 {
		start := uint64(round*1_000_000 + 1)
		cmd := exec.Command(os.Args[0], "-test.run=^TestKillChild$", "-test.count=1")
		cmd.Env = append(os.Environ(), killDirEnv+"="+dir, killStartEnv+"="+strconv.FormatUint(start, 10))
		cmd.Stderr = os.Stderr
		out, err := cmd.StdoutPipe()
		if err != nil {
			t.Fatal(err)
		}
		must(t, cmd.Start())
		acked := make([]*pos, killWriters) // last ack of each writer this round
		killAt := 50 + r.IntN(400)
		acks, ready, killed := 0, false, false
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			f := strings.Fields(sc.Text())
			if len(f) == 0 {
				continue
			}
			switch f[0] {
			case "error":
				t.Fatalf("child: %s", sc.Text())
			case "ready":
				ready = true
			case "ack":
				g, _ := strconv.Atoi(f[1])
				b, _ := strconv.ParseUint(f[2], 10, 64)
				v, _ := strconv.ParseUint(f[3], 10, 64)
				last[g][b] = v
				acked[g] = &pos{b, v}
				acks++
			}
			if ready && acks >= killAt && !killed {
				must(t, cmd.Process.Signal(syscall.SIGKILL))
				killed = true // keep reading: acks already in the pipe count
			}
		}
		err = cmd.Wait()
		if ws, ok := cmd.ProcessState.Sys().(syscall.WaitStatus); !ok || !ws.Signaled() || ws.Signal() != syscall.SIGKILL {
			t.Fatalf("child did not die of SIGKILL: %v", err)
		}

		c := mustOpen(t, killConfig(dir))
		buf := make([]byte, c.bs)
		landed := 0
		for g := range killWriters {
			// The write in flight when the child died may or may not be there.
			inflight := pos{0, start}
			if a := acked[g]; a != nil {
				inflight = pos{a.b + 1, a.v}
				if inflight.b == killBlocks {
					inflight = pos{0, a.v + 1}
				}
			}
			file := killFile(g)
			dirty := map[uint64]bool{}
			for _, b := range c.Dirty(file) {
				dirty[b] = true
			}
			for b := range uint64(killBlocks) {
				k := Key{File: file, Block: b}
				n, _, err := c.ReadDirty(k, buf)
				want := last[g][b]
				if errdefs.IsNotFound(err) {
					if want != 0 {
						t.Fatalf("round %d: acknowledged write %v version %d lost", round, k, want)
					}
					continue
				}
				if err != nil {
					t.Fatalf("round %d: ReadDirty %v: %v", round, k, err)
				}
				v, good := versionOf(file, b, buf[:n])
				ok := good && (v == want || (inflight.b == b && v == inflight.v))
				if !ok {
					t.Fatalf("round %d: %v holds version %d (intact %v); acknowledged %d, in flight %+v", round, k, v, good, want, inflight)
				}
				if !dirty[b] {
					t.Fatalf("round %d: %v is not listed dirty", round, k)
				}
				if v != want {
					landed++ // the in-flight write made it: that is the state now
					last[g][b] = v
				}
			}
		}
		hits := 0
		for b := range uint64(512) {
			k := Key{File: "golden", Block: b}
			got, ok := get(t, c, k)
			if !ok {
				continue
			}
			hits++
			if v, good := versionOf(k.File, b, got); !good || v != 0 {
				t.Fatalf("round %d: clean block %v came back wrong", round, k)
			}
		}
		t.Logf("round %d: killed after %d acks (%d read), %d dirty blocks, %d unacknowledged writes landed, %d clean hits",
			round, killAt, acks, c.Stats().DirtyBlocks, landed, hits)
		c.crash() // the next child opens it
	}
}
